"""The model: one TFLite interpreter and what surrounds it. The file and its metadata, the input tensor filled from
an image (decode, resize, quantization), the outputs decoded by family, labels, and the Detector that joins them."""
