"""The subprocess side of test_multiworker.py (no `test_` prefix: pytest does not collect it).

The training problem mirrors test_distribute.py: every gradient is a small
integer divided by a power of two, so sums over workers are exact in float32
and distributed training must reproduce single-device training bit for bit.
It is written as a Keras model (an `Embedding` table, a dense kernel and a
bias) so that under ParameterServerStrategy the table is partitioned the way a
real Keras model's is.

Usage (run by the test, each with a timeout):

  TF_CONFIG=... python multiworker_job.py mwms OUT_DIR
      One MultiWorkerMirroredStrategy worker. Trains every configuration in
      CONFIGS in turn (fresh model and optimizer each), each worker on its half
      of every global batch, and writes the final state to
      OUT_DIR/worker<task index>.npz. It exits only once every worker's file
      exists: a worker that leaves early can take away data a peer's last
      collective has yet to receive.

  python multiworker_job.py ps OUT_DIR
      The chief of an in-process ParameterServerStrategy cluster (NUM_PS
      parameter servers and one worker, all `tf.distribute.Server`s on
      127.0.0.1 in this process). Trains CONFIGS with the table partitioned
      into TABLE_SHARDS shards and writes OUT_DIR/state.npz and
      OUT_DIR/info.json (types, shapes and devices of each shard and its
      momentum; gradient types). For the first configuration it also writes a
      checkpoint OUT_DIR/ckpt-* and restores it into a fresh model and
      optimizer under the same strategy (state.npz's "restored/..." arrays).

Each job exits on its own at MULTIWORKER_JOB_DEADLINE (Unix time; default in
300 s), printing every thread's stack. Importing this module runs no TensorFlow
op (MultiWorkerMirroredStrategy must be created before any); tf_keras and
tf_lion are imported when first needed.
"""

import faulthandler
import json
import os
import socket
import sys
import time
import warnings

import numpy as np
import tensorflow as tf

import exact_problem  # noqa: E402  (tests/ is on the path: this script's folder, or pytest's)

VOCAB, DIM, OUT, SEQ = exact_problem.VOCAB, exact_problem.DIM, exact_problem.OUT, exact_problem.SEQ
BATCH, STEPS = 8, 4
CONFIGS = [  # (sparse_mode, jit_compile)
    ("exact", True),
    ("lazy", True),
    ("exact", False),
    ("lazy", False),
]
NUM_PS = 2
# MinSizePartitioner(min_shard_bytes=64, max_shards=3) splits the 12 x 4
# float32 table (192 bytes) into 3 shards of 4 rows, placed round robin on the
# parameter servers, and leaves the kernel (48 bytes) and bias whole. The ids
# are < VOCAB // 2, so shards 0 and 1 get lookups and shard 2 never does.
TABLE_SHARDS = 3
MIN_SHARD_BYTES = 64
STATE_KEYS = ("table", "kernel", "bias", "m_table", "m_kernel", "m_bias", "iterations")


def config_name(sparse_mode, jit_compile):
    return f"{sparse_mode}_{'xla' if jit_compile else 'nojit'}"


# --------------------------------------------------------------------------- #
# The problem (tests/exact_problem.py)
# --------------------------------------------------------------------------- #
def batches(seed=3):
    """Global batches of small integers (duplicate ids within and across workers)."""
    return exact_problem.batches(STEPS, BATCH, seed)


def initial_params():
    return exact_problem.initial_params()


def _constant(value):
    """An initializer returning `value`, or the rows of it a partition asks for."""
    def initializer(shape, dtype=None, partition_shape=None, partition_offset=None, **kwargs):
        del shape, kwargs
        rows = value
        if partition_shape is not None:
            start = partition_offset[0]
            rows = value[start:start + partition_shape[0]]
        return tf.constant(rows, dtype=dtype or tf.float32)
    return initializer


_MODEL_CLASS = []


def _model_class():
    if _MODEL_CLASS:
        return _MODEL_CLASS[0]
    import tf_keras

    class LinearProblem(tf_keras.Model):
        """`call(batch)` is the loss: linear in the parameters, exact gradients."""

        def __init__(self):
            super().__init__()
            table, kernel, bias = initial_params()
            self.embedding = tf_keras.layers.Embedding(
                VOCAB, DIM, embeddings_initializer=_constant(table))
            self.kernel = self.add_weight(
                "kernel", shape=(DIM, OUT), initializer=_constant(kernel))
            self.bias = self.add_weight("bias", shape=(OUT,), initializer=_constant(bias))

        def call(self, batch):
            rows = self.embedding(batch["ids"])  # IndexedSlices gradient (per shard)
            loss = tf.reduce_sum(rows * batch["a"])
            loss += tf.reduce_sum(tf.matmul(batch["x"], self.kernel) * batch["y"])
            loss += tf.reduce_sum(self.bias * batch["y"])
            return loss / BATCH  # divided by the *global* batch on every worker

        @property
        def table(self):
            return self.embedding.embeddings

    _MODEL_CLASS.append(LinearProblem)
    return LinearProblem


def make_model():
    model = _model_class()()
    model.embedding.build((None, SEQ))
    return model


# Set by `main` (the jobs, not the test process): every variable takes the
# no-XLA fast paths, ordered updates and fused arithmetic. The problem's
# variables are far below the sizes at which tf_lion uses them
# (`step.CHAIN_MIN_ELEMENTS`, `update.FUSED_MIN_ELEMENTS`); the reference in
# the test process keeps the defaults, so the comparison also checks that
# these paths give the plain path's bits under both strategies.
FORCE_FAST_PATHS = False
FUSED_DEVICES = []  # the devices `update._fused_add_scaled` put its results on


def force_fast_paths():
    import tf_lion

    if tf_lion.update.FUSED_MIN_ELEMENTS == 1:
        return
    tf_lion.step.CHAIN_MIN_ELEMENTS = 1
    tf_lion.update.FUSED_MIN_ELEMENTS = 1
    fused_add_scaled = tf_lion.update._fused_add_scaled

    def recorded(x, a, y):
        out = fused_add_scaled(x, a, y)
        FUSED_DEVICES.append(out.op.device)
        return out
    tf_lion.update._fused_add_scaled = recorded


def make_optimizer(sparse_mode, jit_compile):
    import tf_keras

    import tf_lion

    if FORCE_FAST_PATHS:
        force_fast_paths()

    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=2, decay_rate=0.5)
    return tf_lion.Lion(learning_rate=schedule, beta_1=0.9, beta_2=0.99, weight_decay=0.25,
                        sparse_mode=sparse_mode, jit_compile=jit_compile)


def train(strategy, sparse_mode, jit_compile, coordinator=None, traced=None):
    """Trains STEPS steps under `strategy`; returns `(model, optimizer)`.

    Without a coordinator each replica gets its slice of every global batch;
    with one (ParameterServerStrategy) each step is scheduled on the single
    worker with the whole batch and joined before the next. `traced`, a list,
    receives `[variable name, "IndexedSlices" or "dense"]` for each trainable
    variable as the step is traced.
    """
    with strategy.scope():
        model = make_model()
        opt = make_optimizer(sparse_mode, jit_compile)

    def replica_fn(batch):
        with tf.GradientTape() as tape:
            loss = model(batch)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        if traced is not None:
            traced[:] = [[v.name, type(g).__name__ if isinstance(g, tf.IndexedSlices) else "dense"]
                         for v, g in zip(variables, grads)]
        opt.apply_gradients(zip(grads, variables))

    @tf.function
    def step(batch):
        strategy.run(replica_fn, args=(batch,))

    for batch in batches():
        if coordinator is not None:
            coordinator.schedule(step, args=({k: tf.constant(v) for k, v in batch.items()},))
            coordinator.join()
            continue

        def split(ctx, batch=batch):
            n = BATCH // ctx.num_replicas_in_sync
            start = ctx.replica_id_in_sync_group * n
            return {k: tf.constant(v[start:start + n]) for k, v in batch.items()}

        step(strategy.experimental_distribute_values_from_function(split))
    return model, opt


def _value(variable):
    """A (mirrored, sharded or plain) variable's full value as a numpy array."""
    return np.asarray(tf.convert_to_tensor(variable))


def state(model, opt):
    """{STATE_KEYS: arrays}: variables, momenta (`get_slot(var, "m")`) and the step."""
    variables = [model.table, model.kernel, model.bias]
    values = [_value(v) for v in variables]
    values += [_value(opt.get_slot(v, "m")) for v in variables]
    values.append(np.asarray(opt.iterations.numpy()))
    return dict(zip(STATE_KEYS, values))


# --------------------------------------------------------------------------- #
# MultiWorkerMirroredStrategy worker
# --------------------------------------------------------------------------- #
def run_mwms(out_dir, barrier_timeout=60.0):
    start = time.time()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TF op
    cluster_config = json.loads(os.environ["TF_CONFIG"])
    index, num_workers = cluster_config["task"]["index"], len(cluster_config["cluster"]["worker"])
    arrays = {"num_replicas_in_sync": np.asarray(strategy.num_replicas_in_sync)}
    print(f"[mwms {index}] strategy: {time.time() - start:.1f} s", flush=True)
    for sparse_mode, jit_compile in CONFIGS:
        start = time.time()
        traced = []
        model, opt = train(strategy, sparse_mode, jit_compile, traced=traced)
        name = config_name(sparse_mode, jit_compile)
        for key, value in state(model, opt).items():
            arrays[f"{name}/{key}"] = value
        arrays[f"{name}/gradient_types"] = np.asarray([kind for _, kind in traced])
        arrays[f"{name}/slot_type"] = np.asarray(type(opt.get_slot(model.table, "m")).__name__)
        arrays[f"{name}/table_type"] = np.asarray(type(model.table).__name__)
        print(f"[mwms {index}] {name}: {time.time() - start:.1f} s "
              f"(process cpu so far {time.process_time():.1f} s)", flush=True)
    path = os.path.join(out_dir, f"worker{index}.npz")
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    # File barrier: every worker has finished all its collectives.
    deadline = time.time() + barrier_timeout
    peers = [os.path.join(out_dir, f"worker{i}.npz") for i in range(num_workers)]
    while not all(os.path.exists(p) for p in peers):
        if time.time() > deadline:
            raise SystemExit(f"[mwms {index}] peers did not finish in {barrier_timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- #
# ParameterServerStrategy chief with an in-process cluster
# --------------------------------------------------------------------------- #
def free_ports(n):
    """`n` distinct unused TCP ports on 127.0.0.1 (held open until all are picked)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_ps_cluster(num_ps, num_workers=1):
    """Starts the worker and ps servers in this process; returns the cluster dict.

    On 2 cores a worker needs inter_op_parallelism_threads >= num_workers + 1
    or the first step hangs (as in TensorFlow's own create_in_process_cluster).
    """
    ports = free_ports(num_workers + num_ps + 1)
    cluster = {
        "worker": [f"127.0.0.1:{p}" for p in ports[:num_workers]],
        "ps": [f"127.0.0.1:{p}" for p in ports[num_workers:num_workers + num_ps]],
    }
    spec = tf.train.ClusterSpec(cluster)
    worker_config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=num_workers + 1)
    servers = []
    for i in range(num_workers):
        servers.append(tf.distribute.Server(spec, job_name="worker", task_index=i,
                                            config=worker_config, protocol="grpc", start=True))
    for i in range(num_ps):
        servers.append(tf.distribute.Server(spec, job_name="ps", task_index=i,
                                            protocol="grpc", start=True))
    cluster["chief"] = [f"127.0.0.1:{ports[-1]}"]  # this process, once connected
    return cluster, servers


def _shards(variable):
    return list(variable.variables) if hasattr(variable, "variables") else [variable]


def ps_info(model, opt):
    """Types, shapes and devices of each variable's shards and momentum shards."""
    from tensorflow.python.distribute import sharded_variable

    info = {"trainable_variables": [[v.name, v.shape.as_list(), v.device]
                                    for v in model.trainable_variables]}
    for key, var in (("table", model.table), ("kernel", model.kernel), ("bias", model.bias)):
        slot = opt.get_slot(var, "m")
        info[key] = dict(
            type=type(var).__name__,
            is_sharded=isinstance(var, sharded_variable.ShardedVariable),
            slot_type=type(slot).__name__,
            slot_is_sharded=isinstance(slot, sharded_variable.ShardedVariable),
            shard_shapes=[s.shape.as_list() for s in _shards(var)],
            shard_devices=[s.device for s in _shards(var)],
            slot_shard_shapes=[s.shape.as_list() for s in _shards(slot)],
            slot_shard_devices=[s.device for s in _shards(slot)],
            # Each shard's own slot, asked for shard by shard.
            per_shard_slot_devices=[opt.get_slot(s, "m").device for s in _shards(var)],
        )
    return info


def checkpoint_round_trip(strategy, model, opt, sparse_mode, jit_compile, out_dir, arrays):
    """Saves `tf.train.Checkpoint(model, optimizer)` and restores it into a fresh PS model.

    The restored state goes to `arrays["restored/..."]`; returns a json-able
    report (path, keys and shapes, warnings, `assert_consumed` outcome).
    """
    with warnings.catch_warnings(record=True) as saved_warnings:
        warnings.simplefilter("always")
        path = tf.train.Checkpoint(model=model, optimizer=opt).write(os.path.join(out_dir, "ckpt"))
    with strategy.scope():
        fresh_model = make_model()
        fresh_opt = make_optimizer(sparse_mode, jit_compile)
    with warnings.catch_warnings(record=True) as restore_warnings:
        warnings.simplefilter("always")
        status = tf.train.Checkpoint(model=fresh_model, optimizer=fresh_opt).read(path)
        with strategy.scope():
            fresh_opt.build(fresh_model.trainable_variables)  # creates (and restores) the slots
    for key, value in state(fresh_model, fresh_opt).items():
        arrays[f"restored/{key}"] = value
    try:
        status.assert_consumed()
        consumed_error = None
    except AssertionError as error:
        consumed_error = str(error)
    return dict(
        path=path,
        variables={k: list(shape) for k, shape in tf.train.list_variables(path)},
        save_warnings=[str(w.message) for w in saved_warnings],
        restore_warnings=[str(w.message) for w in restore_warnings],
        restore_assert_consumed_error=consumed_error,
    )


def run_ps(out_dir):
    cluster, servers = start_ps_cluster(NUM_PS)
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type="chief", task_id=0, rpc_layer="grpc")
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=MIN_SHARD_BYTES, max_shards=TABLE_SHARDS)
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=partitioner)
    coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)
    arrays, info = {}, {"num_ps": NUM_PS, "cluster": cluster}
    for i, (sparse_mode, jit_compile) in enumerate(CONFIGS):
        start = time.time()
        traced = []
        del FUSED_DEVICES[:]
        model, opt = train(strategy, sparse_mode, jit_compile, coordinator, traced)
        name = config_name(sparse_mode, jit_compile)
        for key, value in state(model, opt).items():
            arrays[f"{name}/{key}"] = value
        info[name] = ps_info(model, opt)
        info[name]["gradients"] = traced
        info[name]["fused_devices"] = sorted(set(FUSED_DEVICES))
        if i == 0:
            info["checkpoint"] = checkpoint_round_trip(
                strategy, model, opt, sparse_mode, jit_compile, out_dir, arrays)
            info["checkpoint"]["config"] = name
        print(f"[ps] {name}: {time.time() - start:.1f} s "
              f"(process cpu so far {time.process_time():.1f} s)", flush=True)
    np.savez(os.path.join(out_dir, "state.npz"), **arrays)
    with open(os.path.join(out_dir, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    del servers  # in-process servers cannot be stopped; the process exits


def main(argv):
    # Never outlive the test that started us (even if it was killed): at
    # MULTIWORKER_JOB_DEADLINE (Unix time) dump every thread's stack and exit.
    deadline = float(os.environ.get("MULTIWORKER_JOB_DEADLINE", time.time() + 300))
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time()), exit=True)
    mode, out = argv[1], argv[2]
    global FORCE_FAST_PATHS
    FORCE_FAST_PATHS = True
    if mode == "mwms":
        run_mwms(out)
    elif mode == "ps":
        run_ps(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.flush()
    sys.stderr.flush()
    # In-process gRPC servers and collective executors keep threads alive and
    # can block interpreter shutdown; everything is written, so leave now.
    os._exit(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv)
