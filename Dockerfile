# The job's image: the official Ray image with batch_detect installed (models and jobs/ included).
#   docker build -t batch-detect:latest . && docker tag/push to your registry
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /app
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users batch_detect ./batch_detect
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users models ./models
RUN pip install --no-cache-dir . && batch-detect inspect models/shapes_ssd_uint8.tflite > /dev/null
