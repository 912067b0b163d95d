"""One writer per output: the lease's rules (live, dead, stale, unreadable holders), its renewal on a thread
of its own (retried when the store fails, the run stopped before the lease can go stale), and a run whose
lease is taken over mid-run: it stops and writes nothing more into the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from batch_detect.output import lease as lease_module
from batch_detect.config import RunConfig
from batch_detect.errors import LeaseLost, OutputError, StoreUnavailable
from batch_detect.outage import OUTAGE
from batch_detect.output.lease import Lease
from batch_detect.run.pipeline import run
from batch_detect.output.sink import LOCK, MANIFEST, OutputStore
from batch_detect.synthetic import write_dataset


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_lease_rules(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease.acquire(store)
    with pytest.raises(OutputError, match="being written by another"):
        Lease.acquire(store)  # live: this very process holds it
    lease.release()
    assert not store.exists(LOCK)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = json.loads(json.dumps({"token": "t", "host": os.uname().nodename, "pid": int(dead.stdout),
                                    "acquired_at": time.time(), "renewed_at": time.time()}))
    store.put_atomic(LOCK, json.dumps(holder).encode())
    taken = Lease.acquire(store)  # its process is gone: taken over at once
    store.put_atomic(LOCK, json.dumps({**holder, "token": "other", "host": "elsewhere"}).encode())
    with pytest.raises(LeaseLost, match="taken over by another run"):
        taken.renew()  # a run that lost its lease stops instead of writing beside the new holder
    taken.release()
    assert json.loads(store.fs.cat_file(store.path(LOCK)))["token"] == "other"  # not its to delete
    store.put_atomic(LOCK, json.dumps({**holder, "host": "elsewhere", "renewed_at": time.time() - 600}).encode())
    Lease.acquire(store).release()  # another machine's lease, not renewed for 10 minutes: stale
    store.put_atomic(LOCK, json.dumps({**holder, "host": "elsewhere", "renewed_at": time.time()}).encode())
    with pytest.raises(OutputError, match="being written by another"):
        Lease.acquire(store)  # another machine's live lease
    beat = lease_module._heartbeat("t")
    store.put_atomic(LOCK, json.dumps({**holder, "host": "elsewhere", "renewed_at": time.time() - 600}).encode())
    store.put_atomic(beat, json.dumps({"token": "t", "renewed_at": time.time()}).encode())
    with pytest.raises(OutputError, match="being written by another"):
        Lease.acquire(store)  # an old lock, but its holder's heartbeat is fresh: live
    store.put_atomic(beat, json.dumps({"token": "t", "renewed_at": time.time() - 600}).encode())
    Lease.acquire(store).release()  # both old: stale, taken over, and the old heartbeat goes with it
    assert not store.exists(beat) and not store.exists(LOCK)
    store.put_atomic(LOCK, json.dumps({**holder, "host": "elsewhere", "renewed_at": time.time()}).encode())
    store.put_atomic(LOCK, b"")  # unreadable (torn, foreign): judged by the file's age, fresh here
    with pytest.raises(OutputError, match="being written by another"):
        Lease.acquire(store)
    os.utime(store.path(LOCK), (time.time() - 600, time.time() - 600))
    Lease.acquire(store).release()


def test_renewal_runs_on_its_own_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_S", 0.1)
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease.acquire(store)
    lock = store.fs.cat_file(store.path(LOCK))
    beat = lease_module._heartbeat(lease.token)

    def renewed_at() -> float:
        return json.loads(store.fs.cat_file(store.path(beat)))["renewed_at"] if store.exists(beat) else 0.0

    # nobody calls it: the thread renews while the driver waits on something else
    assert wait_for(lambda: renewed_at() > 0)
    first = renewed_at()
    assert wait_for(lambda: renewed_at() > first)
    # the lock itself is never rewritten: a renewal racing a takeover cannot overwrite the new holder's
    assert store.fs.cat_file(store.path(LOCK)) == lock
    lease.check()
    lease.release()
    assert not store.exists(LOCK) and not store.exists(beat) and not lease._thread.is_alive()


def test_takeover_is_seen_without_a_renew_call(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_S", 0.1)
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease.acquire(store)
    other = {"token": "other", "host": "elsewhere", "pid": 1, "renewed_at": time.time()}
    store.put_atomic(LOCK, json.dumps(other).encode())
    assert wait_for(lambda: lease.lost is not None), "the renewal thread never saw the takeover"
    with pytest.raises(LeaseLost, match="taken over by another run .*'elsewhere'"):
        lease.check()
    lease.release()
    assert json.loads(store.fs.cat_file(store.path(LOCK)))["token"] == "other"


def test_failed_renewals_are_retried_then_pause_writes_until_the_lease_is_proved(tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_S", 0.1)
    monkeypatch.setattr(lease_module, "STALL_S", 1.0)
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease.acquire(store)
    store.fence = lease.fence
    # A real failure of the store: where the heartbeat's temp file goes, a directory (writing it raises
    # IsADirectoryError); the lock stays as it is.
    blocked = store._tmp(lease_module._heartbeat(lease.token))
    os.mkdir(blocked)
    assert wait_for(lambda: lease.last_error is not None), "no renewal failed"
    lease.check()  # one failure does not stop the run
    assert "IsADirectoryError" in lease.last_error
    os.rmdir(blocked)  # the store is back: the next renewal succeeds
    assert wait_for(lambda: lease.last_error is None), f"never renewed again: {lease.last_error}"
    lease.check()

    # Failing past STALL_S: the run does not stop (a store that fails for a minute is a normal day), but
    # the lease is in doubt and nothing the driver writes goes out until a renewal proves it still ours.
    os.mkdir(blocked)
    assert wait_for(lambda: time.monotonic() - lease.renewed > 1.0, 5)
    lease.check()
    probe = tmp_path / "out" / "probe.json"
    writer = threading.Thread(target=store.write_json, args=("probe.json", {"written": True}))
    writer.start()
    time.sleep(1.0)
    assert lease.in_doubt and writer.is_alive() and not probe.exists(), "a write went out on a lease in doubt"
    os.rmdir(blocked)
    writer.join(10)
    assert probe.exists() and not lease.in_doubt

    # Past --store-timeout the write gives up, naming the output and the time, instead of waiting forever.
    monkeypatch.setattr(OUTAGE, "budget_s", 1.5)
    os.mkdir(blocked)
    assert wait_for(lambda: time.monotonic() - lease.renewed > 1.6, 5)
    with pytest.raises(StoreUnavailable, match=r"could not be renewed for \d+ s \(last error: IsADirectoryError"):
        store.write_json("probe.json", {"written": "again"})
    assert json.loads(probe.read_text()) == {"written": True}
    os.rmdir(blocked)
    lease.release()


def driver_files(out: str) -> dict[str, bytes]:
    """What the driver alone writes: the manifest, the commit log, the plan and the parts (workers stage shards)."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), out)
            if rel == MANIFEST or rel.split(os.sep)[0] in ("_log", "_plan", "images", "detections", "failures"):
                found[rel] = open(os.path.join(out, rel), "rb").read()
    return found


def test_a_run_whose_lease_is_taken_writes_nothing_more(models_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_S", 0.05)
    noticed = threading.Event()
    renew = Lease.renew

    def observed_renew(self) -> None:  # the real renewal, and a sign when it finds the lease taken
        try:
            renew(self)
        except LeaseLost:
            noticed.set()
            raise

    monkeypatch.setattr(Lease, "renew", observed_renew)
    images, out = str(tmp_path / "images"), str(tmp_path / "out")
    write_dataset(images, 96, seed=5, sizes=((96, 72),))
    lock = os.path.join(out, LOCK)
    seen: dict = {}

    def take_over(summary: dict) -> None:  # at the first staged shard, another run takes the output
        if seen:
            return
        other = {"token": "other", "host": "elsewhere", "pid": 1, "renewed_at": time.time()}
        with open(lock + ".tmp", "w") as fh:
            json.dump(other, fh)
        os.replace(lock + ".tmp", lock)
        assert noticed.wait(30), "the renewal thread never saw the takeover"
        seen.update(driver_files(out))

    config = RunConfig(model=os.path.join(models_dir, "shapes_ssd_uint8.tflite"), input=images, output=out,
                       shard_size=8, num_actors=1)
    with pytest.raises(LeaseLost, match="taken over by another run"):
        run(config, on_shard=take_over)
    assert MANIFEST in seen, "the run wrote no manifest before its first shard"
    after = driver_files(out)
    assert after == seen, f"written after the takeover: {sorted(k for k in after if after[k] != seen.get(k))}"
    assert json.loads(open(lock).read())["token"] == "other", "the new holder's lease was removed"


def test_renewal_on_s3_survives_a_throttled_store(s3_server, monkeypatch):
    """On the real S3 protocol (conditional create, then renewals from the lease's thread), through a proxy
    that answers every object GET 503 SlowDown for a while: the renewals fail and are retried, the run is
    not stopped, and renewing resumes once the store answers again."""
    import s3fs
    from flaky_proxy import FlakyProxy

    monkeypatch.setattr(lease_module, "RENEW_S", 0.2)
    so = {"key": "testing-key-id", "secret": "testing-secret", "client_kwargs": {"endpoint_url": s3_server}}
    bucket = f"lease-{os.getpid()}"
    s3fs.S3FileSystem(**so, skip_instance_cache=True).mkdir(bucket)
    with FlakyProxy(s3_server) as proxy:
        flaky = {**so, "client_kwargs": {"endpoint_url": proxy.url},
                 "config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True}
        store = OutputStore(f"s3://{bucket}/out", flaky)
        lease = Lease.acquire(store)
        with pytest.raises(OutputError, match="being written by another"):
            Lease.acquire(OutputStore(f"s3://{bucket}/out", flaky))  # the conditional put refuses a second
        proxy.fail_fraction = 1.0
        assert wait_for(lambda: OUTAGE.state().unavailable_s is not None, 30), "no renewal failed through the proxy"
        failed = OUTAGE.state().last_error
        assert proxy.injected > 0 and "SlowDown" in failed or "reduce your request rate" in failed, failed
        assert "testing-secret" not in failed, failed
        lease.check()  # failing renewals alone do not stop the run
        proxy.fail_fraction = 0.0
        assert wait_for(lambda: OUTAGE.state().unavailable_s is None and time.monotonic() - lease.renewed < 1, 30), \
            f"never renewed again: {OUTAGE.state()}"
        lease.check()
        lease.release()
        assert not store.exists(LOCK)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_proof_and_a_takeover_at_once_leave_exactly_one_holder(tmp_path, monkeypatch, where, request):
    """A holder proving its lease after a stall (its lock last renewed 10 minutes ago: stale to anyone who
    reads it before the proof, fresh after) and another run taking it over, started together 30 times: each
    time exactly one of them holds it and the lock names that one. Both are conditional (a file system: the
    lock renamed aside and compared; S3: If-Match), where a takeover that removed the lock it had judged
    stale could remove the holder's fresh proof instead, and both believed they held it."""
    if where == "s3":
        import s3fs

        endpoint = request.getfixturevalue("s3_server")
        so = {"key": "testing-key-id", "secret": "x", "endpoint_url": endpoint, "skip_instance_cache": True}
        bucket = f"lease-race-{os.getpid()}"
        s3fs.S3FileSystem(**so).mkdir(bucket)
        out, options = f"s3://{bucket}/out", so
    else:
        out, options = str(tmp_path / "out"), None
    for i in range(30):
        store = OutputStore(f"{out}{i}", options)
        holder = Lease.acquire(store, renewing=False)
        stale = json.dumps({**holder.holder, "renewed_at": time.time() - 600}).encode()
        store.put_atomic(LOCK, stale)  # as if this run had stalled for 10 minutes
        holder.written, holder.etag = stale, store.unfenced_fs.info(store.path(LOCK)).get("ETag")
        holder.in_doubt = True
        start = threading.Barrier(2)
        got: dict = {}

        def prove():
            start.wait()
            try:
                holder.renew()
                got["holder"] = True
            except LeaseLost:
                got["holder"] = False

        def take():
            start.wait()
            try:
                got["taker"] = Lease.acquire(OutputStore(f"{out}{i}", options), renewing=False)
            except OutputError:
                got["taker"] = None

        threads = [threading.Thread(target=prove), threading.Thread(target=take)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winner = holder if got["holder"] else got["taker"]
        assert got["holder"] != (got["taker"] is not None), (i, got)
        assert json.loads(store.fs.cat_file(store.path(LOCK)))["token"] == winner.token, i


def test_a_renewal_after_a_long_stall_proves_the_lease_even_if_the_driver_never_looked(tmp_path):
    """Unrenewed past STALL_S, the next renewal proves the lease conditionally even when neither check() nor
    fence() ran meanwhile (they are what mark it in doubt): a lock rewritten behind this run's back, though
    it still names this run, is not trusted on a read."""
    store = OutputStore(str(tmp_path / "out"))
    lease = Lease.acquire(store, renewing=False)
    rewritten = json.dumps({**lease.holder, "note": "rewritten by someone else"}).encode()
    store.put_atomic(LOCK, rewritten)
    lease.renew()  # renewed a moment ago: a read is enough, as always
    lease.renewed -= lease_module.STALL_S + 1
    assert not lease.in_doubt
    with pytest.raises(LeaseLost, match="changed while the store was unavailable"):
        lease.renew()


_CAS_WORKER = r'''
import sys
from batch_detect.output.lease import _swap_local
path, rounds = sys.argv[1], int(sys.argv[2])
won = 0
for _ in range(rounds):
    with open(path, "rb") as fh:
        seen = fh.read()
    if _swap_local(path, seen, str(int(seen) + 1).encode()):
        won += 1
print(won)
'''


def test_the_file_system_compare_and_swap_is_atomic_across_processes(tmp_path):
    """Three processes each add 1 to a counter in the lock file 300 times with _swap_local (read, then swap
    only if unchanged): the counter ends at exactly the number of swaps that succeeded. A compare and a
    replace that two processes could interleave would lose increments."""
    path = tmp_path / LOCK
    path.write_bytes(b"0")
    procs = [subprocess.Popen([sys.executable, "-c", _CAS_WORKER, str(path), "300"], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    won = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert int(path.read_bytes()) == sum(won) and sum(won) > 300, won
