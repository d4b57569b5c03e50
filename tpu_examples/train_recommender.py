r"""An embedding-heavy recommender trained with tf_lion.Lion(sparse_mode="lazy").

A two-tower click model: user and item embedding tables (tf_keras Embedding
layers, so their gradients are sparse `tf.IndexedSlices`), combined by a dot
product plus a small MLP over [u, v, u * v], trained with binary
cross-entropy. Lion's lazy mode updates only the rows looked up in a step,
so the cost of an update follows the batch, not the table.

--strategy:
  mirrored  MirroredStrategy over the local devices (--cpu_devices=N splits the
            CPU into N logical devices).
  tpu       TPUStrategy on --tpu (default "local", i.e. on a TPU VM).
  ps        ParameterServerStrategy on an in-process cluster of --ps_servers
            parameter servers and --ps_workers workers (tf.distribute.Server on
            127.0.0.1; the coordinator/chief is this process). The embedding
            tables are split over the parameter servers (a MinSizePartitioner
            makes them ShardedVariables) and a ClusterCoordinator schedules the
            steps on the workers, each reading its own per-worker dataset.

Synthetic data with learnable structure: ids are drawn with a power law
(popular users/items appear often), every id belongs to one of --clusters
hidden clusters (a hash of the id), and the click label is the sign of a fixed
random cluster-affinity matrix, flipped with probability --label_noise. The
best possible loss is the binary entropy of --label_noise (printed).

Output (parseable):

    initial_loss 0.6903 step 0
    step 20 loss 0.6668 steps_per_sec 3.5
    final_loss 0.4150 step 400
"""

import math
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import tf_lion  # noqa: E402
from tpu_examples import common  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "ps", "tpu"], "Distribution strategy.")
flags.DEFINE_string("tpu", None,
                    "With --strategy=tpu: Cloud TPU name, or 'local' (the default) on a TPU VM.")
flags.DEFINE_integer("cpu_devices", 0, "--strategy=mirrored without GPUs: logical CPU devices.")
flags.DEFINE_integer("ps_workers", 1, "--strategy=ps: in-process worker servers.")
flags.DEFINE_integer("ps_servers", 2, "--strategy=ps: in-process parameter servers.")
flags.DEFINE_integer("ps_min_shard_bytes", 256 << 10,
                     "--strategy=ps: MinSizePartitioner min_shard_bytes (variables smaller than "
                     "this stay whole; the embedding tables are split over the servers).")
flags.DEFINE_integer("num_users", 1_000_000, "Rows of the user embedding table.")
flags.DEFINE_integer("num_items", 100_000, "Rows of the item embedding table.")
flags.DEFINE_integer("embedding_dim", 32, "Embedding width.")
flags.DEFINE_integer("mlp_dim", 64,
                     "Hidden width of the MLP over [u, v, u*v]; 0: dot product only.")
flags.DEFINE_integer("clusters", 16, "Synthetic data: hidden clusters of users and of items.")
flags.DEFINE_float("label_noise", 0.1, "Synthetic data: probability of flipping a label.")
flags.DEFINE_float("id_skew", 3.0, "Synthetic data: id = floor(rows * u**skew), u ~ U[0, 1).")
flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
flags.DEFINE_integer("train_steps", 1000, "Training steps.")
flags.DEFINE_integer("steps_per_loop", 50, "Steps per host call (per scheduled function on ps).")
flags.DEFINE_integer("eval_batches", 4, "Batches for initial_loss/final_loss.")
flags.DEFINE_float("learning_rate", 1e-3, "Lion learning rate (constant).")
flags.DEFINE_float("weight_decay", 0.0, "Lion weight decay (lazy: applied to looked-up rows).")
flags.DEFINE_float("beta_1", 0.9, "Lion beta_1.")
flags.DEFINE_float("beta_2", 0.99, "Lion beta_2.")
flags.DEFINE_enum("sparse_mode", "lazy", ["lazy", "exact"], "Lion sparse_mode.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "Lion's jit_compile (per-variable XLA updates). auto: on for mirrored; off on "
                  "tpu (the whole step is one XLA program anyway) and on ps (one small XLA "
                  "program per shard gains little there; see README).")
flags.DEFINE_string("model_dir", None,
                    "If set: restore the latest checkpoint at start, save one at the end.")
flags.DEFINE_integer("seed", 0, "Seed.")


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
def build_model(num_users, num_items, dim, mlp_dim):
    user = tf_keras.Input(shape=(), dtype=tf.int32, name="user")
    item = tf_keras.Input(shape=(), dtype=tf.int32, name="item")
    u = tf_keras.layers.Embedding(
        num_users, dim, embeddings_initializer=tf_keras.initializers.RandomNormal(stddev=0.05),
        name="user_embedding")(user)
    v = tf_keras.layers.Embedding(
        num_items, dim, embeddings_initializer=tf_keras.initializers.RandomNormal(stddev=0.05),
        name="item_embedding")(item)
    logit = tf_keras.layers.Dot(axes=1, name="dot")([u, v])
    if mlp_dim:
        h = tf_keras.layers.Concatenate(name="features")(
            [u, v, tf_keras.layers.Multiply(name="product")([u, v])])
        h = tf_keras.layers.Dense(mlp_dim, activation="relu", name="mlp_hidden")(h)
        h = tf_keras.layers.Dense(1, name="mlp_out")(h)
        logit = tf_keras.layers.Add(name="logit")([logit, h])
    return tf_keras.Model({"user": user, "item": item}, logit, name="two_tower")


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def binary_entropy(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))


def synthetic_batches(batch_size, seed, first_batch=0):
    """Infinite batches of ({"user", "item"}, label); batch i is a function of (seed, i)."""
    affinity = tf.constant(
        np.random.default_rng(FLAGS.seed).standard_normal((FLAGS.clusters, FLAGS.clusters)),
        tf.float32)
    clusters = tf.constant(FLAGS.clusters, tf.int64)

    def cluster_of(ids, salt):
        # A fixed pseudo-random cluster per id (multiplicative hash).
        return ((tf.cast(ids, tf.int64) + salt) * 2654435761 % 4294967296) // 65536 % clusters

    def make_batch(index):
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.cast(seed, tf.int64), index]), num=3)
        draw = tf.random.stateless_uniform([2, batch_size], seeds[0])
        users = tf.cast(FLAGS.num_users * draw[0] ** FLAGS.id_skew, tf.int32)
        items = tf.cast(FLAGS.num_items * draw[1] ** FLAGS.id_skew, tf.int32)
        users = tf.minimum(users, FLAGS.num_users - 1)
        items = tf.minimum(items, FLAGS.num_items - 1)
        score = tf.gather_nd(affinity, tf.stack([cluster_of(users, 1), cluster_of(items, 7)], 1))
        flip = tf.random.stateless_uniform([batch_size], seeds[1]) < FLAGS.label_noise
        label = tf.cast(tf.math.logical_xor(score > 0, flip), tf.float32)
        return {"user": users, "item": items}, label

    return (tf.data.Dataset.range(first_batch, 2**62)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


# --------------------------------------------------------------------------- #
# Strategies
# --------------------------------------------------------------------------- #
def ps_training_dataset_fn(batch_size, seed, first_step):
    """The `dataset_fn` of `ClusterCoordinator.create_per_worker_dataset` for training.

    Worker w reads the stream of seed `seed + 1 + w` from batch `first_step` on
    (w from `experimental_get_current_worker_index`, in the function each worker
    runs). A resumed run passes the restored step count, which counts the steps
    of all workers: each worker starts past every batch it read before.
    """
    def dataset_fn():
        worker = tf.cast(tf.distribute.coordinator.experimental_get_current_worker_index(),
                         tf.int64)
        return synthetic_batches(batch_size, seed + 1 + worker, first_step)
    return dataset_fn


def start_local_ps_cluster(num_workers, num_ps):
    """Starts in-process worker and ps servers on 127.0.0.1; returns (resolver, servers).

    This process is the coordinator (chief). On a 2-core machine the servers
    need inter_op_parallelism_threads >= num_workers + 1, or the first step
    can deadlock waiting for a free inter-op thread.
    """
    spec = {
        "worker": [f"127.0.0.1:{common.free_port()}" for _ in range(num_workers)],
        "ps": [f"127.0.0.1:{common.free_port()}" for _ in range(num_ps)],
    }
    cluster = tf.train.ClusterSpec(spec)
    config = tf.compat.v1.ConfigProto()
    config.inter_op_parallelism_threads = num_workers + 1
    servers = [
        tf.distribute.Server(cluster, job_name=job, task_index=i, protocol="grpc",
                             config=config, start=True)
        for job, addresses in spec.items() for i in range(len(addresses))
    ]
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(cluster, rpc_layer="grpc")
    return resolver, servers


def make_strategy():
    if FLAGS.strategy == "tpu":
        return common.make_strategy(tpu=FLAGS.tpu or "local")
    if FLAGS.strategy == "mirrored":
        return common.make_strategy(cpu_devices=FLAGS.cpu_devices)
    resolver, servers = start_local_ps_cluster(FLAGS.ps_workers, FLAGS.ps_servers)
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
        min_shard_bytes=FLAGS.ps_min_shard_bytes, max_shards=FLAGS.ps_servers)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)
    strategy._local_servers = servers  # keep the in-process servers alive with the strategy
    return strategy, "ps"


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def main(argv):
    del argv
    strategy, kind = make_strategy()
    common.log(common.describe(strategy, kind))
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        raise ValueError(f"--batch_size must be a multiple of the {replicas} replicas")
    tf_keras.utils.set_random_seed(FLAGS.seed)
    jit = FLAGS.jit_compile == "true" or (FLAGS.jit_compile == "auto" and kind == "mirrored")

    with strategy.scope():
        model = build_model(FLAGS.num_users, FLAGS.num_items, FLAGS.embedding_dim, FLAGS.mlp_dim)
        optimizer = tf_lion.Lion(
            learning_rate=FLAGS.learning_rate, beta_1=FLAGS.beta_1, beta_2=FLAGS.beta_2,
            weight_decay=FLAGS.weight_decay, sparse_mode=FLAGS.sparse_mode, jit_compile=jit)
        optimizer.build(model.trainable_variables)
    tables = {layer.name: layer.embeddings for layer in model.layers
              if isinstance(layer, tf_keras.layers.Embedding)}
    for name, table in tables.items():
        shards = getattr(table, "variables", [table])  # a ShardedVariable's shards
        common.log(f"{name} {table.shape.as_list()} {type(table).__name__} shards {len(shards)} "
                   f"devices {[s.device for s in shards]}")
        # Lion keeps one momentum per shard, next to its shard.
        momenta = [optimizer.get_slot(s, "m") for s in shards]
        common.log(f"{name} momentum shapes {[m.shape.as_list() for m in momenta]} "
                   f"devices {[m.device for m in momenta]}")
    common.log(f"sparse_mode {FLAGS.sparse_mode} jit_compile {jit} label_noise {FLAGS.label_noise} "
               f"loss_floor {binary_entropy(FLAGS.label_noise):.4f} uniform_loss {math.log(2):.4f}")

    def momentum_abs_sum():
        """Sum of |m| over all of Lion's momenta (shards included): a resume check."""
        return sum(float(tf.reduce_sum(tf.abs(tf.cast(optimizer.get_slot(v, "m"), tf.float64))))
                   for v in model.trainable_variables)

    checkpoint = manager = None
    if FLAGS.model_dir:
        # Model and optimizer in one checkpoint: Lion's momenta are saved with
        # (keyed to) their variables, one per shard of a ShardedVariable.
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        manager = tf.train.CheckpointManager(checkpoint, FLAGS.model_dir, max_to_keep=2)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            common.log(f"restored from step {int(optimizer.iterations.numpy())} "
                       f"checkpoint {manager.latest_checkpoint} "
                       f"momentum_abs_sum {momentum_abs_sum():.6e}")
    start = int(optimizer.iterations.numpy())

    def replica_loss(batch):
        features, labels = batch
        logits = model(features, training=True)[:, 0]
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))

    def replica_step(batch):
        with tf.GradientTape() as tape:
            loss = replica_loss(batch)
            scaled = loss / replicas
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def mean_over_replicas(per_replica):
        if kind == "ps":  # one replica per worker: the value is local already
            return per_replica
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    @tf.function
    def train_loop(iterator, num_steps):
        total = tf.constant(0.0)
        for _ in tf.range(num_steps):
            total += mean_over_replicas(strategy.run(replica_step, args=(next(iterator),)))
        return total / tf.cast(num_steps, tf.float32)

    @tf.function
    def eval_loop(iterator, num_batches):
        total = tf.constant(0.0)
        for _ in tf.range(num_batches):
            total += mean_over_replicas(strategy.run(replica_loss, args=(next(iterator),)))
        return total / tf.cast(num_batches, tf.float32)

    per_replica_batch = FLAGS.batch_size // replicas

    if kind == "ps":
        coordinator = tf.distribute.coordinator.ClusterCoordinator(strategy)

        train_iterator = iter(coordinator.create_per_worker_dataset(
            ps_training_dataset_fn(per_replica_batch, FLAGS.seed * 1000, start)))

        def evaluate():
            # A fresh per-worker iterator: the same fixed eval batches, on any worker.
            eval_dataset = coordinator.create_per_worker_dataset(
                lambda: synthetic_batches(per_replica_batch, FLAGS.seed * 1000 + 500))
            value = coordinator.schedule(
                eval_loop, args=(iter(eval_dataset), tf.constant(FLAGS.eval_batches)))
            return float(value.fetch())

        def run_steps(num_steps):
            # Schedule the loops; fetch their losses once they have all run.
            pending, left = [], num_steps
            while left > 0:
                n = min(FLAGS.steps_per_loop, left)
                pending.append((n, coordinator.schedule(
                    train_loop, args=(train_iterator, tf.constant(n)))))
                left -= n
            coordinator.join()
            return [(n, float(value.fetch())) for n, value in pending]
    else:
        def dataset_fn(seed_offset, first_step):
            def fn(input_context):
                # Each pipeline feeds replicas / pipelines batches per step.
                per_step = (input_context.num_replicas_in_sync
                            // input_context.num_input_pipelines)
                return synthetic_batches(
                    input_context.get_per_replica_batch_size(FLAGS.batch_size),
                    FLAGS.seed * 1000 + seed_offset + input_context.input_pipeline_id,
                    first_step * per_step)
            return fn

        train_iterator = iter(strategy.distribute_datasets_from_function(dataset_fn(0, start)))
        eval_dataset = strategy.distribute_datasets_from_function(dataset_fn(500, 0))

        def evaluate():
            return float(eval_loop(iter(eval_dataset), tf.constant(FLAGS.eval_batches)))

        def run_steps(num_steps):
            n = min(FLAGS.steps_per_loop, num_steps)
            return [(n, float(train_loop(train_iterator, tf.constant(n))))]

    common.log(f"initial_loss {evaluate():.4f} step {start}")
    current = start
    while current < FLAGS.train_steps:
        # On ps one report covers several scheduled loops (up to 4 per worker).
        chunk = FLAGS.steps_per_loop * (4 * FLAGS.ps_workers if kind == "ps" else 1)
        began = time.time()
        results = run_steps(min(chunk, FLAGS.train_steps - current))
        elapsed = time.time() - began
        done = sum(n for n, _ in results)
        loss = sum(n * value for n, value in results) / done
        current += done
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {current}")
        common.log(f"step {current} loss {loss:.4f} steps_per_sec {done / elapsed:.1f}")
    common.log(f"final_loss {evaluate():.4f} step {int(optimizer.iterations.numpy())}")
    if manager is not None:
        path = manager.save(checkpoint_number=current)
        common.log(f"saved checkpoint {path} momentum_abs_sum {momentum_abs_sum():.6e}")


if __name__ == "__main__":
    app.run(main)
