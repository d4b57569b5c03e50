"""Multi-process distribution: MultiWorkerMirroredStrategy and ParameterServerStrategy.

The strategies run in subprocesses (tests/multiworker_job.py): two
MultiWorkerMirroredStrategy workers talking over gRPC on 127.0.0.1, and a
ParameterServerStrategy chief hosting an in-process cluster (2 parameter
servers, 1 worker). This process cannot host them: TensorFlow is already
initialised here with 2 logical CPUs, and collectives must be configured
before any op runs.

The problem is test_distribute.py's exact-arithmetic one (integer data,
power-of-two batch), written as a Keras model, so training under either
strategy must equal single-device training in this process bit for bit:
variables, momenta and the step count, in both sparse modes, with and
without XLA. Under ParameterServerStrategy the Keras `Embedding` table is a
ShardedVariable of 3 shards on 2 parameter servers; one shard never gets a
lookup. The PS job also saves a `tf.train.Checkpoint(model=..., optimizer=...)`
and restores it under the same strategy; this process restores it into an
unsharded single-device model.

All jobs start together when the first test of the module needs them and run
concurrently with the single-device reference training; every subprocess has a
timeout and is killed at module teardown at the latest.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf

import multiworker_job as job

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
JOB_SCRIPT = os.path.join(TESTS_DIR, "multiworker_job.py")
NUM_WORKERS = 2
JOB_TIMEOUT = 120  # seconds, for each job (measured ~30-45 s on a busy 2-core machine)
CONFIGS = [pytest.param(mode, jit, id=job.config_name(mode, jit)) for mode, jit in job.CONFIGS]


def _env(tf_config=None):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_DIR, env.get("PYTHONPATH")]))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    # The job dumps its threads' stacks and exits a little before we would kill it.
    env["MULTIWORKER_JOB_DEADLINE"] = str(time.time() + JOB_TIMEOUT - 5)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


class _Job:
    """A subprocess of multiworker_job.py, its output going to a log file."""

    def __init__(self, name, args, out_dir, env):
        self.name = name
        self.log_path = os.path.join(out_dir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, JOB_SCRIPT, *args], cwd=out_dir, env=env,
                stdout=log, stderr=subprocess.STDOUT)

    def wait(self, deadline):
        """The exit code, or None if the job is still running at `deadline`."""
        try:
            return self.proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines=60):
        with open(self.log_path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


class _JobGroup:
    """Jobs that succeed or fail together (the MWMS workers, or the PS chief)."""

    def __init__(self, name, jobs):
        self.name, self.jobs = name, jobs
        self.started = time.time()
        self._error = None
        self._done = False

    def result(self):
        """Waits (until JOB_TIMEOUT) for every job; fails with their logs unless all exit 0."""
        if not self._done:
            self._done = True
            deadline = self.started + JOB_TIMEOUT
            codes = [j.wait(deadline) for j in self.jobs]
            seconds = time.time() - self.started
            for j in self.jobs:
                j.kill()
            if any(code != 0 for code in codes):
                logs = "\n".join(
                    f"--- {j.name}: "
                    + (f"killed after {JOB_TIMEOUT} s" if code is None else f"exit code {code}")
                    + f" ---\n{j.tail()}" for j, code in zip(self.jobs, codes))
                self._error = f"{self.name} failed after {seconds:.0f} s:\n{logs}"
        if self._error:
            pytest.fail(self._error, pytrace=False)


def _start_mwms(out_dir):
    os.makedirs(out_dir)
    ports = job.free_ports(NUM_WORKERS)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    jobs = [_Job(f"mwms_worker{i}", ["mwms", out_dir], out_dir,
                 _env({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(NUM_WORKERS)]
    return _JobGroup("MultiWorkerMirroredStrategy workers", jobs)


def _start_ps(out_dir):
    os.makedirs(out_dir)
    return _JobGroup("ParameterServerStrategy chief",
                     [_Job("ps_chief", ["ps", out_dir], out_dir, _env())])


@pytest.fixture(scope="module")
def _jobs(request):
    """Starts the jobs this session's selected tests need, all at once."""
    needed = {name for item in request.session.items
              for name in ("mwms_run", "ps_run") if name in item.fixturenames}
    out_dir = tempfile.mkdtemp(prefix="tf_lion_multiworker_")
    groups = {}
    try:
        if "mwms_run" in needed:
            groups["mwms"] = _start_mwms(os.path.join(out_dir, "mwms"))
        if "ps_run" in needed:
            groups["ps"] = _start_ps(os.path.join(out_dir, "ps"))
        yield groups
    finally:
        for group in groups.values():
            for j in group.jobs:
                j.kill()
        shutil.rmtree(out_dir, ignore_errors=True)


def _lazy(load):
    """A zero-argument function that calls `load` once (tests call it when they need it)."""
    cache = []

    def get():
        if not cache:
            cache.append(load())
        return cache[0]
    return get


@pytest.fixture(scope="module")
def mwms_run(_jobs):
    """`() -> [worker 0's arrays, worker 1's arrays]`, waiting for the workers."""
    def load():
        group = _jobs["mwms"]
        group.result()
        out_dir = os.path.dirname(group.jobs[0].log_path)
        return [dict(np.load(os.path.join(out_dir, f"worker{i}.npz")))
                for i in range(NUM_WORKERS)]
    return _lazy(load)


@pytest.fixture(scope="module")
def ps_run(_jobs):
    """`() -> (arrays, info)` of the parameter-server chief, waiting for it."""
    def load():
        group = _jobs["ps"]
        group.result()
        out_dir = os.path.dirname(group.jobs[0].log_path)
        with open(os.path.join(out_dir, "info.json")) as f:
            info = json.load(f)
        return dict(np.load(os.path.join(out_dir, "state.npz"))), info
    return _lazy(load)


@pytest.fixture(scope="module")
def reference(_jobs):
    """`(sparse_mode, jit_compile) -> state` of single-device training in this process.

    The first call trains every configuration, while the jobs run.
    """
    def load():
        strategy = tf.distribute.get_strategy()
        return {(mode, jit): job.state(*job.train(strategy, mode, jit))
                for mode, jit in job.CONFIGS}
    states = _lazy(load)
    return lambda sparse_mode, jit_compile: states()[(sparse_mode, jit_compile)]


def _assert_bitwise_equal(got, expected, what):
    for key in job.STATE_KEYS:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{what}: {key}")


def _config_state(arrays, name):
    return {key: arrays[f"{name}/{key}"] for key in job.STATE_KEYS}


def _assert_trained(state, sparse_mode):
    """Every variable moved (every element, in exact mode) and the step count is STEPS."""
    for key, initial in zip(("table", "kernel", "bias"), job.initial_params()):
        moved = state[key] != initial
        assert moved.all() if sparse_mode == "exact" else moved.any(), key
    if sparse_mode == "lazy":  # rows never looked up keep their bits, momentum included
        unseen = slice(job.VOCAB // 2, None)
        np.testing.assert_array_equal(state["table"][unseen], job.initial_params()[0][unseen])
        assert not state["m_table"][unseen].any()
    assert state["iterations"] == job.STEPS


# --------------------------------------------------------------------------- #
# MultiWorkerMirroredStrategy: 2 worker processes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("sparse_mode,jit_compile", CONFIGS)
def test_multi_worker_mirrored_equals_single_device_bitwise(
        mwms_run, reference, sparse_mode, jit_compile):
    name = job.config_name(sparse_mode, jit_compile)
    expected = reference(sparse_mode, jit_compile)
    _assert_trained(expected, sparse_mode)
    results = mwms_run()
    workers = [_config_state(arrays, name) for arrays in results]
    for index, state in enumerate(workers):
        assert results[index]["num_replicas_in_sync"] == NUM_WORKERS
        _assert_bitwise_equal(state, expected, f"worker {index} vs single device")
    _assert_bitwise_equal(workers[1], workers[0], "worker 1 vs worker 0")


def test_multi_worker_mirrored_sparse_gradients_and_mirrored_slots(mwms_run):
    for arrays in mwms_run():
        for mode, jit in job.CONFIGS:
            name = job.config_name(mode, jit)
            # The Keras Embedding's gradient reaches the optimizer as IndexedSlices.
            assert arrays[f"{name}/gradient_types"].tolist() == ["IndexedSlices", "dense", "dense"]
            assert str(arrays[f"{name}/table_type"]) == "MirroredVariable"
            assert str(arrays[f"{name}/slot_type"]) == "MirroredVariable"


# --------------------------------------------------------------------------- #
# ParameterServerStrategy: 2 parameter servers, 1 worker, a sharded Keras Embedding
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("sparse_mode,jit_compile", CONFIGS)
def test_parameter_server_sharded_embedding_equals_single_device_bitwise(
        ps_run, reference, sparse_mode, jit_compile):
    """One worker, each step scheduled and joined in turn: synchronous training.

    The table's 3 shards each get their own sparse gradient with shard-local
    indices (shard 2 an empty one); values and momenta, concatenated over the
    shards, must equal the unsharded single-device run.
    """
    name = job.config_name(sparse_mode, jit_compile)
    expected = reference(sparse_mode, jit_compile)
    _assert_trained(expected, sparse_mode)
    arrays, info = ps_run()
    assert info[name]["table"]["is_sharded"]
    _assert_bitwise_equal(_config_state(arrays, name), expected,
                          "parameter server vs single device")


@pytest.mark.parametrize("sparse_mode,jit_compile", CONFIGS)
def test_parameter_server_fused_sums_run_on_the_parameter_servers(ps_run, sparse_mode, jit_compile):
    """The job forces every variable onto the no-XLA fast paths (the bitwise
    test above checks their numbers); the fused sums were built for the
    parameter servers holding the variables, both of them, and never under XLA."""
    _, info = ps_run()
    devices = info[job.config_name(sparse_mode, jit_compile)]["fused_devices"]
    if jit_compile or platform.machine().lower() not in ("x86_64", "amd64"):
        assert devices == []
    else:
        specs = [tf.DeviceSpec.from_string(d) for d in devices]
        assert {(s.job, s.task, s.device_type) for s in specs} == {("ps", 0, "CPU"),
                                                                    ("ps", 1, "CPU")}


@pytest.mark.parametrize("sparse_mode,jit_compile", CONFIGS)
def test_parameter_server_momentum_shards_live_with_their_shards(ps_run, sparse_mode, jit_compile):
    _, info = ps_run()
    config = info[job.config_name(sparse_mode, jit_compile)]
    # Keras yields the shards, not the ShardedVariable, as trainable variables,
    # and the tape gives each shard its own IndexedSlices.
    shards = [f"embeddings/part_{i}:0" for i in range(job.TABLE_SHARDS)]
    names = [name for name, _, _ in config["trainable_variables"]]
    assert names == shards + ["kernel:0", "bias:0"]
    assert config["gradients"] == [[s, "IndexedSlices"] for s in shards] + [
        ["kernel:0", "dense"], ["bias:0", "dense"]]

    table = config["table"]
    assert table["type"] == "ShardedVariable" and table["slot_type"] == "ShardedVariable"
    rows = job.VOCAB // job.TABLE_SHARDS
    assert table["shard_shapes"] == [[rows, job.DIM]] * job.TABLE_SHARDS
    assert table["slot_shard_shapes"] == table["shard_shapes"]
    # Round robin over both parameter servers; each momentum shard next to its shard.
    assert {d.split("/device:")[0] for d in table["shard_devices"]} == {
        f"/job:ps/replica:0/task:{i}" for i in range(job.NUM_PS)}
    assert table["slot_shard_devices"] == table["shard_devices"]
    assert table["per_shard_slot_devices"] == table["shard_devices"]

    for key in ("kernel", "bias"):  # too small to partition: one variable each, also on a PS
        variable = config[key]
        assert not variable["is_sharded"] and not variable["slot_is_sharded"]
        assert variable["shard_devices"][0].startswith("/job:ps/")
        assert variable["slot_shard_devices"] == variable["shard_devices"]


# --------------------------------------------------------------------------- #
# Checkpoints of a sharded table's momentum
# --------------------------------------------------------------------------- #
def _checkpointed_state(arrays, info):
    return _config_state(arrays, info["checkpoint"]["config"])


def test_parameter_server_checkpoint_saves_whole_table_and_momentum(ps_run):
    """The sharded table and its sharded momentum are saved as whole [VOCAB, DIM] tensors."""
    _, info = ps_run()
    saved = info["checkpoint"]["variables"]
    slot = "/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    for path, shape in (("model/embedding/embeddings", [job.VOCAB, job.DIM]),
                        ("model/kernel", [job.DIM, job.OUT]), ("model/bias", [job.OUT])):
        assert saved[path + "/.ATTRIBUTES/VARIABLE_VALUE"] == shape
        assert saved[path + slot] == shape
    assert not [k for k in saved if "part_" in k]


def test_parameter_server_checkpoint_restores_into_single_device_model(ps_run):
    arrays, info = ps_run()
    path = info["checkpoint"]["path"]
    mode, jit = info["checkpoint"]["config"].split("_")
    model = job.make_model()
    opt = job.make_optimizer(mode, jit == "xla")
    status = tf.train.Checkpoint(model=model, optimizer=opt).read(path)
    opt.build(model.trainable_variables)  # the momenta are restored as they are created
    status.assert_consumed()
    _assert_bitwise_equal(job.state(model, opt), _checkpointed_state(arrays, info),
                          "restored on one device vs trained under PS")


def test_parameter_server_checkpoint_save_does_not_claim_sharded_slots_are_missing(ps_run):
    """The momentum of a sharded table *is* saved (through the ShardedVariable)."""
    _, info = ps_run()
    assert not [w for w in info["checkpoint"]["save_warnings"] if "NOT saved" in w]


def test_parameter_server_checkpoint_restores_into_fresh_sharded_model(ps_run):
    """Resuming under ParameterServerStrategy brings every momentum shard back."""
    arrays, info = ps_run()
    restored = {key: arrays[f"restored/{key}"] for key in job.STATE_KEYS}
    _assert_bitwise_equal(restored, _checkpointed_state(arrays, info),
                          "restored under PS vs trained under PS")
    assert info["checkpoint"]["restore_assert_consumed_error"] is None
