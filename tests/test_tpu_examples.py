"""The scripts in tpu_examples/ run end to end on CPU, learn, and resume.

Each example runs as a subprocess (its own TensorFlow; `--cpu_devices=2` for a
2-replica MirroredStrategy) with tiny sizes, and its parseable output is
checked: the loss must fall by a clear margin. `train_lm.py` is killed with
SIGKILL between two checkpoints and restarted with the same --model_dir: it
must resume from the checkpoint's step, redo the lost steps identically and
finish. The parameter-server recommender is restarted from its checkpoint
too, which checks that Lion's per-shard momenta come back.

To keep the wall time down on a 2-core machine the example runs go to a pool
of two threads (at most two example processes at a time), started together
by the first test; each test waits for the runs it checks.
"""

import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tensorflow as tf

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "tpu_examples"
TIMEOUT = 240  # seconds per example process (each takes ~10-20 s on 2 cores)

# train_lm.py: a tiny model, and the schedule that the lr check recomputes.
LM_STEPS, LM_CHECKPOINT_EVERY, LM_STEPS_PER_LOOP = 300, 100, 20
LM_PEAK_LR, LM_WARMUP, LM_FINAL_FRACTION = 3e-3, 20, 0.1
LM_FLAGS = [
    "--vocab=64", "--seq_len=32", "--d_model=32", "--layers=1", "--heads=2",
    "--batch_size=16", f"--train_steps={LM_STEPS}", f"--steps_per_loop={LM_STEPS_PER_LOOP}",
    f"--checkpoint_every={LM_CHECKPOINT_EVERY}", f"--warmup_steps={LM_WARMUP}",
    f"--learning_rate={LM_PEAK_LR}", f"--final_lr_fraction={LM_FINAL_FRACTION}",
    "--jit_compile=false", "--cpu_devices=2",
]
LM_KILL_AT = LM_CHECKPOINT_EVERY + LM_STEPS_PER_LOOP  # first host loop after a checkpoint
RECOMMENDER_FLAGS = [
    "--num_users=2000", "--num_items=500", "--embedding_dim=16", "--clusters=4",
    "--batch_size=256", "--steps_per_loop=20", "--learning_rate=3e-3",
]
RECOMMENDER_STEPS = 400
PS_FLAGS = ["--strategy=ps", "--ps_workers=1", "--ps_servers=2", "--ps_min_shard_bytes=4096"]
KERAS_FIT_FLAGS = [
    "--epochs=4", "--steps_per_epoch=40", "--steps_per_execution=10", "--batch_size=128",
    "--vocab=200", "--learning_rate=3e-3", "--jit_compile=false", "--cpu_devices=2",
]


# --------------------------------------------------------------------------- #
# Running examples and reading their output
# --------------------------------------------------------------------------- #
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command(script, args):
    return [sys.executable, str(EXAMPLES / script), *args]


def _errors(stderr):
    """The end of a subprocess's stderr without TensorFlow's INFO chatter."""
    keep = [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"^(I\d{4} |INFO:)", line)]
    return "\n".join(keep)[-6000:]


class ExampleFailed(AssertionError):
    pass


def _run(script, args):
    """Runs an example to completion; returns (stdout, seconds). Raises on a non-zero exit."""
    began = time.time()
    proc = subprocess.run(_command(script, args), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise ExampleFailed(
            f"{script} {' '.join(args)} exited with {proc.returncode}\n--- stdout ---\n"
            f"{proc.stdout[-3000:]}\n--- stderr ---\n{_errors(proc.stderr)}")
    return proc.stdout, time.time() - began


def _run_until(script, args, stop_line, stderr_path):
    """Starts an example, reads its stdout live and SIGKILLs it once a line
    starts with `stop_line`; returns (stdout, returncode, seconds)."""
    began = time.time()
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(_command(script, args), cwd=REPO, env=_env(),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    watchdog = threading.Timer(TIMEOUT, proc.kill)  # a silent hang must not block the read
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(stop_line):
                proc.send_signal(signal.SIGKILL)
                break
        lines.extend(proc.stdout.read().splitlines(keepends=True))
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    return "".join(lines), proc.returncode, time.time() - began


def _value(pattern, text):
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def _losses(text):
    """{'initial': x, 'final': y} from the `initial_loss`/`final_loss` lines."""
    return {"initial": _value(r"^initial_loss ([\d.]+)", text),
            "final": _value(r"^final_loss ([\d.]+)", text)}


def _lm_steps(text):
    """[(step, loss, lr)] from train_lm's `step N loss X lr Y ...` lines."""
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^step (\d+) loss ([\d.]+) lr ([\d.e+-]+)", text, re.MULTILINE)]


def _lm_schedule(step):
    """train_lm.WarmupCosine with the test's flags, recomputed independently."""
    if step < LM_WARMUP:
        return LM_PEAK_LR * min(step + 1, LM_WARMUP) / LM_WARMUP
    progress = min(max((step - LM_WARMUP) / (LM_STEPS - LM_WARMUP), 0.0), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return LM_PEAK_LR * (LM_FINAL_FRACTION + (1 - LM_FINAL_FRACTION) * cosine)


# --------------------------------------------------------------------------- #
# The example runs ("jobs"), started together by the first test that needs one
# --------------------------------------------------------------------------- #
def _job_lm(model_dir):
    """train_lm.py killed after the first loop past its first checkpoint, then rerun."""
    args = [*LM_FLAGS, f"--model_dir={model_dir}"]
    first, returncode, first_seconds = _run_until(
        "train_lm.py", args, f"step {LM_KILL_AT} ", model_dir.parent / "run1.stderr")
    if returncode != -signal.SIGKILL:
        stderr = _errors((model_dir.parent / "run1.stderr").read_text())
        raise ExampleFailed(f"train_lm.py run 1 was not killed (exit {returncode}):\n{first}\n"
                            f"--- stderr ---\n{stderr}")
    second, second_seconds = _run("train_lm.py", args)
    return dict(first=first, second=second, seconds=(first_seconds, second_seconds))


def _job_recommender_ps(model_dir):
    """The parameter-server run, then the same command for 20 more steps (restores)."""
    args = [*PS_FLAGS, *RECOMMENDER_FLAGS, f"--model_dir={model_dir}"]
    first, first_seconds = _run("train_recommender.py",
                                [*args, f"--train_steps={RECOMMENDER_STEPS}"])
    second, second_seconds = _run("train_recommender.py",
                                  [*args, f"--train_steps={RECOMMENDER_STEPS + 20}"])
    return dict(first=first, second=second, seconds=(first_seconds, second_seconds))


def _job_recommender_mirrored(model_dir):
    return _run("train_recommender.py",
                ["--strategy=mirrored", "--cpu_devices=2", "--jit_compile=false",
                 *RECOMMENDER_FLAGS, f"--train_steps={RECOMMENDER_STEPS}",
                 f"--model_dir={model_dir}"])


def _job_keras_fit(model_dir):
    return _run("keras_fit.py", [*KERAS_FIT_FLAGS, f"--model_dir={model_dir}"])


_PS_STREAMS_SCRIPT = """
import json, sys
import tensorflow as tf
from absl import flags
from tpu_examples import train_recommender as tr
flags.FLAGS(["x", "--num_users=2000", "--num_items=500", "--clusters=4"])
tf.random.set_seed(0)  # as main() does: must not make the workers' streams alike
resolver, servers = tr.start_local_ps_cluster(2, 1)
coordinator = tf.distribute.coordinator.ClusterCoordinator(
    tf.distribute.ParameterServerStrategy(resolver))
iterator = iter(coordinator.create_per_worker_dataset(tr.ps_training_dataset_fn(4, 10, 7)))

@tf.function
def read(iterator):
    return (tf.distribute.coordinator.experimental_get_current_worker_index(),
            next(iterator)[0]["user"])

values = [coordinator.schedule(read, args=(iterator,)) for _ in range(16)]
coordinator.join()
expected = [[b[0]["user"].numpy().tolist() for b in tr.synthetic_batches(4, 10 + 1 + w).take(30)]
            for w in range(2)]
read = [(int(w), u.tolist()) for w, u in (v.fetch() for v in values)]
print(json.dumps(dict(read=read, expected=expected)))
"""


def _job_ps_streams(model_dir):
    """Two workers read the per-worker training dataset of train_recommender.py."""
    del model_dir
    proc = subprocess.run([sys.executable, "-c", _PS_STREAMS_SCRIPT], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise ExampleFailed(f"exit {proc.returncode}\n{proc.stdout}\n{_errors(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Longest first, so the two threads finish at about the same time.
_JOBS = {
    "lm": (_job_lm, {"test_train_lm_killed_between_checkpoints_resumes_exactly"}),
    "recommender_ps": (_job_recommender_ps,
                       {"test_recommender_parameter_server_sharded_embeddings_learn",
                        "test_recommender_parameter_server_restores_sharded_momentum"}),
    "keras_fit": (_job_keras_fit, {"test_keras_fit_with_backup_and_restore_learns"}),
    "recommender_mirrored": (_job_recommender_mirrored,
                             {"test_recommender_mirrored_lazy_lion_learns"}),
    "ps_streams": (_job_ps_streams,
                   {"test_recommender_parameter_server_workers_read_their_own_streams"}),
}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """{job: (future, model_dir)} for the jobs of the selected tests."""
    selected = {item.name for item in request.session.items}
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {}
    for name, (job, tests) in _JOBS.items():
        if tests & selected:
            model_dir = tmp_path_factory.mktemp(name) / "model_dir"
            futures[name] = (executor.submit(job, model_dir), model_dir)
    yield futures
    executor.shutdown(wait=True, cancel_futures=True)


def _result(jobs, name):
    future, model_dir = jobs[name]
    return future.result(), model_dir


# --------------------------------------------------------------------------- #
# train_lm.py
# --------------------------------------------------------------------------- #
def test_train_lm_killed_between_checkpoints_resumes_exactly(jobs):
    result, model_dir = _result(jobs, "lm")
    first, second = result["first"], result["second"]

    # Run 1 was killed (not finished) after checkpoint 100, during 100..200.
    assert "final_loss" not in first, f"run 1 finished before it was killed:\n{first}"
    assert "no checkpoint in" in first, first
    saved = [int(s) for s in re.findall(r"^saved checkpoint step (\d+)", first, re.MULTILINE)]
    assert saved == [LM_CHECKPOINT_EVERY], first
    lost = {step: loss for step, loss, _ in _lm_steps(first) if step > LM_CHECKPOINT_EVERY}
    assert LM_KILL_AT in lost, first

    # Run 2 (the same command) resumed from step 100, not 0, and reached the end.
    assert int(_value(r"^restored from step (\d+)", second)) == LM_CHECKPOINT_EVERY, second
    steps = _lm_steps(second)
    assert [s for s, _, _ in steps] == list(
        range(LM_CHECKPOINT_EVERY + LM_STEPS_PER_LOOP, LM_STEPS + 1, LM_STEPS_PER_LOOP)), second
    assert re.search(rf"^saved checkpoint step {LM_STEPS} ", second, re.MULTILINE), second
    assert re.search(rf"^final_loss [\d.]+ step {LM_STEPS}$", second, re.MULTILINE), second
    # Model, Lion's momentum and the data stream resumed exactly: the redone
    # host loop logs the loss that run 1 logged for it before it was killed.
    redone = {step: loss for step, loss, _ in steps}
    for step, loss in lost.items():
        assert redone[step] == pytest.approx(loss, abs=2e-4), (step, loss, redone[step])
    # The optimizer's step counter came back too: the learning rate continues
    # the warm-up + cosine schedule (from step 0 it would be warming up).
    for step, _, lr in steps:
        assert lr == pytest.approx(_lm_schedule(step - 1), rel=1e-4), (step, lr)

    # It learns: from ~ln(64) = 4.16 towards the Markov chain's entropy (~1.05).
    start, resumed = _value(r"^initial_loss ([\d.]+)", first), _losses(second)
    assert start > 3.5, first
    assert resumed["initial"] < start - 1.5, (start, resumed)  # restored, not from scratch
    assert resumed["final"] < start - 2.5, (start, resumed)
    first_steps = _lm_steps(first)
    assert first_steps[-1][1] < first_steps[0][1] - 1.0, first

    # TensorBoard event files (one per run) with loss and learning-rate scalars.
    events = sorted((model_dir / "train").glob("events.out.tfevents.*"))
    assert len(events) == 2, events
    scalars = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor))
    assert {"loss", "learning_rate"} <= set(scalars), scalars.keys()
    assert min(scalars["loss"]) == LM_STEPS_PER_LOOP and max(scalars["loss"]) == LM_STEPS
    assert scalars["loss"][LM_STEPS] < scalars["loss"][LM_STEPS_PER_LOOP] - 2.0, scalars["loss"]
    assert scalars["learning_rate"][LM_STEPS] == pytest.approx(_lm_schedule(LM_STEPS - 1), rel=1e-4)
    print(f"\ntrain_lm: run 1 (killed) {result['seconds'][0]:.1f}s, run 2 "
          f"{result['seconds'][1]:.1f}s; initial_loss {start} -> resumed at "
          f"{resumed['initial']} -> final {resumed['final']}")


def _write_token_records(path, documents):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for tokens in documents:
            feature = tf.train.Feature(int64_list=tf.train.Int64List(value=tokens))
            example = tf.train.Example(features=tf.train.Features(feature={"tokens": feature}))
            writer.write(example.SerializeToString())


def test_train_lm_tfrecord_input_format(tmp_path):
    """--data: tf.train.Example records with an int64 list feature "tokens",
    concatenated and cut into windows of seq_len + 1 tokens (runs in process)."""
    from tpu_examples import train_lm

    documents = [list(range(0, 7)), list(range(100, 103)), list(range(200, 212))]
    _write_token_records(tmp_path / "part-0.tfrecord", documents)
    ds = train_lm.tfrecord_batches(str(tmp_path / "part-*.tfrecord"), batch_size=2, length=5,
                                   vocab=300, input_context=None, shuffle_seed=None)
    assert ds.element_spec.shape.as_list() == [2, 5]  # static, as TPUs need
    # Unshuffled, one file: the documents in order, repeated, cut every 5 tokens.
    stream = [t for _ in range(3) for d in documents for t in d]
    windows = [row for batch in ds.take(6) for row in batch.numpy().tolist()]
    assert windows == [stream[i:i + 5] for i in range(0, 60, 5)], windows

    # More input pipelines (hosts) than files: one would read nothing.
    two_hosts = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1)
    with pytest.raises(ValueError, match=r"--data=.*1 file\(s\), fewer than the 2"):
        train_lm.tfrecord_batches(str(tmp_path / "part-*.tfrecord"), 2, 5, 300, two_hosts, None)

    _write_token_records(tmp_path / "bad.tfrecord", [[1, 2, 999]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocab"):
        next(iter(train_lm.tfrecord_batches(str(tmp_path / "bad.tfrecord"), 1, 2, 300,
                                            None, None)))


# --------------------------------------------------------------------------- #
# train_recommender.py and keras_fit.py
# --------------------------------------------------------------------------- #
def test_recommender_mirrored_lazy_lion_learns(jobs):
    (out, seconds), _ = _result(jobs, "recommender_mirrored")
    assert "replicas 2" in out and "sparse_mode lazy" in out, out
    losses = _losses(out)
    # From ln 2 = 0.693 towards the label-noise floor 0.325.
    assert losses["initial"] > 0.65 and losses["final"] < losses["initial"] - 0.15, out
    print(f"\nrecommender mirrored {seconds:.1f}s: {losses}")


def test_keras_fit_with_backup_and_restore_learns(jobs):
    (out, seconds), model_dir = _result(jobs, "keras_fit")
    assert "replicas 2" in out, out
    losses = _losses(out)
    assert losses["final"] < losses["initial"] - 0.4, out
    epochs = re.findall(r"^epoch (\d+) loss ([\d.]+) .* step (\d+)$", out, re.MULTILINE)
    assert [(int(e), int(s)) for e, _, s in epochs] == [(1, 40), (2, 80), (3, 120), (4, 160)], out
    assert float(epochs[-1][1]) < float(epochs[0][1]) - 0.2, out
    assert "resumed at epoch" not in out  # a fresh model_dir
    # BackupAndRestore removes its backup after a finished fit; the summaries stay.
    assert list((model_dir / "train").glob("events.out.tfevents.*"))
    print(f"\nkeras_fit {seconds:.1f}s: {losses}")


def test_recommender_parameter_server_sharded_embeddings_learn(jobs):
    """ParameterServerStrategy, in-process cluster (1 worker, 2 parameter
    servers): each embedding table is a ShardedVariable of two shards, each
    shard with its own Lion momentum on its own server, and the model learns."""
    result, _ = _result(jobs, "recommender_ps")
    out = result["first"]
    assert "strategy ps" in out, out
    for table, rows in (("user_embedding", 2000), ("item_embedding", 500)):
        assert re.search(rf"^{table} \[{rows}, 16\] ShardedVariable shards 2", out,
                         re.MULTILINE), out
        shards = rf"\[\[{rows // 2}, 16\], \[{rows // 2}, 16\]\]"
        momenta = re.search(rf"^{table} momentum shapes {shards} devices (.*)$", out, re.MULTILINE)
        assert momenta and "/job:ps/replica:0/task:0" in momenta.group(1) \
            and "/job:ps/replica:0/task:1" in momenta.group(1), out
    losses = _losses(out)
    assert losses["initial"] > 0.65 and losses["final"] < losses["initial"] - 0.15, out
    print(f"\nrecommender ps {result['seconds'][0]:.1f}s: {losses}")


def test_recommender_parameter_server_restores_sharded_momentum(jobs):
    """Restarting the parameter-server run from its checkpoint brings back
    Lion's momenta, including those of the ShardedVariable shards.

    This checks tf_lion's checkpointing of per-shard slots (a tf_lion
    ShardedVariable feature), not the example: the example only saves
    tf.train.Checkpoint(model=model, optimizer=optimizer) and restores it.
    """
    result, _ = _result(jobs, "recommender_ps")
    first, second = result["first"], result["second"]
    saved = _value(r"^saved checkpoint \S+ momentum_abs_sum ([\d.e+-]+)", first)
    assert saved > 0, first
    assert int(_value(r"^restored from step (\d+)", second)) == RECOMMENDER_STEPS, second
    restored = _value(r"^restored from step .* momentum_abs_sum ([\d.e+-]+)", second)
    assert restored == pytest.approx(saved, rel=1e-5), (
        f"Lion momentum |m| summed over all variables: {saved} saved at step "
        f"{RECOMMENDER_STEPS}, {restored} after restoring that checkpoint under "
        f"ParameterServerStrategy")
    assert re.search(rf"^final_loss [\d.]+ step {RECOMMENDER_STEPS + 20}$", second, re.MULTILINE)


def test_recommender_parameter_server_workers_read_their_own_streams(jobs):
    """Under a global seed (as the script sets), each worker reads the stream of
    its own index from the given batch on: no two workers read the same batches,
    and a resumed run (first batch = restored step) does not read them again."""
    result, _ = _result(jobs, "ps_streams")
    expected, by_worker = result["expected"], {}
    assert expected[0][:10] != expected[1][:10]
    for worker, users in result["read"]:
        by_worker.setdefault(worker, []).append(users)
    assert set(by_worker) <= {0, 1} and sum(map(len, by_worker.values())) == 16, result["read"]
    for worker, batches in by_worker.items():
        # A worker runs its closures one at a time: its batches are 7, 8, ... of
        # its stream, in an order the test cannot see.
        assert sorted(batches) == sorted(expected[worker][7:7 + len(batches)]), worker
