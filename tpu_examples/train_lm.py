r"""A small decoder-only Transformer language model trained with tf_lion.Lion.

Custom training loop for TPUs (TPUStrategy with --tpu) that also runs on
GPUs/CPUs (MirroredStrategy over the local devices):

* one `tf.function` per host call runs `--steps_per_loop` training steps in a
  `tf.range` loop (`strategy.run` per step, the distributed iterator passed in);
* `mixed_bfloat16` by default (`--mixed_precision=float32` for full precision);
* a cosine learning-rate schedule with linear warm-up (`WarmupCosine` below);
* a `tf.train.CheckpointManager` in --model_dir holding the model, the
  optimizer (with Lion's momentum) and the step: rerunning the same command
  after a preemption resumes from the latest checkpoint;
* TensorBoard summaries (loss, learning rate) in --model_dir/train.

Data: --data is a glob of TFRecord files of `tf.train.Example`s with one int64
list feature "tokens" (a document's token ids, any length, ids < --vocab).
Documents are concatenated and cut into windows of --seq_len + 1 tokens. Without
--data a synthetic corpus is generated from a fixed random Markov chain (each
token is followed by one of --markov_branching fixed successors, or with
probability --markov_noise by a uniformly random token), so the loss falls from
about ln(vocab) towards the chain's entropy, which is printed.

Output (one line per host loop, parseable):

    restored from step 100 checkpoint /tmp/lm/ckpt-100     (or: no checkpoint in ...)
    initial_loss 1.1133 step 100
    step 120 loss 1.1647 lr 0.00224935 steps_per_sec 87.5
    saved checkpoint step 200 path /tmp/lm/ckpt-200
    final_loss 1.0933 step 300

`initial_loss`/`final_loss` are the mean loss over --eval_batches fixed batches
(the same batches at the start and at the end of a run).
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

flags.DEFINE_string("tpu", None, "Cloud TPU name, or 'local' on a TPU VM. Unset: MirroredStrategy.")
flags.DEFINE_integer("cpu_devices", 0,
                     "Without --tpu and GPUs: split the CPU into this many logical devices "
                     "(MirroredStrategy replicas). 0 or 1: one device.")
flags.DEFINE_string("model_dir", "/tmp/tf_lion_lm",
                    "Checkpoints and TensorBoard logs (gs:// on TPU).")
flags.DEFINE_string("data", None, "Glob of TFRecord files of tf.train.Example with int64 list "
                    "feature 'tokens'. Unset: synthetic Markov-chain corpus.")
flags.DEFINE_integer("vocab", 256, "Vocabulary size (token ids must be < vocab).")
flags.DEFINE_integer("seq_len", 128, "Tokens per training sequence.")
flags.DEFINE_integer("d_model", 256, "Model width.")
flags.DEFINE_integer("layers", 4, "Transformer blocks.")
flags.DEFINE_integer("heads", 4, "Attention heads (must divide d_model).")
flags.DEFINE_integer("mlp_dim", 0, "Hidden width of the MLP blocks; 0 means 4 * d_model.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (divided over the replicas).")
flags.DEFINE_integer("train_steps", 2000, "Total training steps (including resumed ones).")
flags.DEFINE_integer("steps_per_loop", 50, "Training steps per host call (tf.range loop).")
flags.DEFINE_integer("checkpoint_every", 500, "Save a checkpoint every this many steps.")
flags.DEFINE_integer("max_checkpoints", 3, "Checkpoints to keep.")
flags.DEFINE_integer("eval_batches", 4, "Batches for initial_loss/final_loss.")
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate (after warm-up).")
flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
flags.DEFINE_float("final_lr_fraction", 0.1, "Learning rate at the end, as a fraction of the peak.")
flags.DEFINE_float("weight_decay", 0.1, "Lion's decoupled weight decay.")
flags.DEFINE_float("beta_1", 0.9, "Lion beta_1.")
flags.DEFINE_float("beta_2", 0.99, "Lion beta_2 (the paper uses 0.98 for some LMs).")
flags.DEFINE_enum("sparse_mode", "exact", ["exact", "lazy"],
                  "Lion sparse_mode (for the embedding's gradient).")
flags.DEFINE_enum("momentum_dtype", None, ["float32", "bfloat16"], "Lion momentum_dtype.")
flags.DEFINE_enum("mixed_precision", "bfloat16", ["bfloat16", "float32"],
                  "bfloat16: tf_keras 'mixed_bfloat16' policy (float32 variables); float32: none.")
flags.DEFINE_bool("jit_compile", True,
                  "XLA-compile the per-replica forward/backward pass and Lion's updates on "
                  "CPU/GPU. On TPU the whole step is one XLA program regardless.")
flags.DEFINE_integer("markov_branching", 2, "Synthetic data: successors per token.")
flags.DEFINE_float("markov_noise", 0.05, "Synthetic data: probability of a random next token.")
flags.DEFINE_integer("seed", 0, "Seed for the model, the Markov chain and the data.")


# --------------------------------------------------------------------------- #
# Learning-rate schedule
# --------------------------------------------------------------------------- #
class WarmupCosine(tf_keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to
    `peak * final_fraction` at `decay_steps` (constant afterwards)."""

    def __init__(self, peak, warmup_steps, decay_steps, final_fraction=0.1):
        super().__init__()
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        warm = self.peak * tf.minimum(step + 1.0, warmup) / warmup
        span = tf.cast(max(self.decay_steps - self.warmup_steps, 1), tf.float32)
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
        decayed = self.peak * (self.final_fraction + (1.0 - self.final_fraction) * cosine)
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self):
        return dict(peak=self.peak, warmup_steps=self.warmup_steps,
                    decay_steps=self.decay_steps, final_fraction=self.final_fraction)


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
class PositionEmbedding(tf_keras.layers.Layer):
    """Adds a learned [seq_len, d_model] position embedding."""

    def __init__(self, seq_len, **kwargs):
        super().__init__(**kwargs)
        self.seq_len = seq_len

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", shape=(self.seq_len, input_shape[-1]),
            initializer=tf_keras.initializers.RandomNormal(stddev=0.02))
        super().build(input_shape)

    def call(self, x):
        return x + tf.cast(self.embeddings, x.dtype)[tf.newaxis, : tf.shape(x)[1]]

    def get_config(self):
        return {**super().get_config(), "seq_len": self.seq_len}


def build_model(vocab, seq_len, d_model, num_layers, heads, mlp_dim):
    """Pre-LayerNorm decoder-only Transformer: tokens [B, T] -> float32 logits [B, T, vocab]."""
    if d_model % heads:
        raise ValueError(f"--heads={heads} must divide --d_model={d_model}")
    tokens = tf_keras.Input(shape=(seq_len,), dtype=tf.int32, name="tokens")

    def init():  # a fresh initializer per layer (a reused unseeded one repeats its values)
        return tf_keras.initializers.RandomNormal(stddev=0.02)

    x = tf_keras.layers.Embedding(vocab, d_model, embeddings_initializer=init(),
                                  name="token_embedding")(tokens)
    x = PositionEmbedding(seq_len, name="position_embedding")(x)
    for i in range(num_layers):
        h = tf_keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln1")(x)
        h = tf_keras.layers.MultiHeadAttention(
            num_heads=heads, key_dim=d_model // heads, kernel_initializer=init(),
            name=f"block{i}_attention")(h, h, use_causal_mask=True)
        x = tf_keras.layers.Add(name=f"block{i}_residual1")([x, h])
        h = tf_keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{i}_ln2")(x)
        h = tf_keras.layers.Dense(mlp_dim, activation="gelu", kernel_initializer=init(),
                                  name=f"block{i}_mlp_in")(h)
        h = tf_keras.layers.Dense(d_model, kernel_initializer=init(), name=f"block{i}_mlp_out")(h)
        x = tf_keras.layers.Add(name=f"block{i}_residual2")([x, h])
    x = tf_keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
    # Logits in float32 under mixed precision (a stable softmax cross-entropy).
    logits = tf_keras.layers.Dense(vocab, kernel_initializer=init(), dtype="float32",
                                   name="logits")(x)
    return tf_keras.Model(tokens, logits, name="decoder_lm")


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def markov_chain(vocab, branching, seed):
    """The fixed successor table [vocab, branching] of the synthetic corpus."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(vocab, branching)).astype(np.int32)


def markov_entropy(successors, noise):
    """Mean over states of the next-token entropy (nats): the loss floor."""
    vocab, branching = successors.shape
    total = 0.0
    for row in successors:
        p = np.full(vocab, noise / vocab)
        np.add.at(p, row, (1.0 - noise) / branching)
        total -= float(np.sum(p * np.log(p)))
    return total / vocab


def synthetic_batches(successors, batch_size, length, noise, seed, first_batch=0):
    """An infinite dataset of [batch_size, length] Markov-chain sequences.

    Batch `i` is a pure function of (seed, i) (stateless random ops), so a
    resumed run continues the stream where it stopped instead of replaying it.
    """
    vocab, branching = successors.shape
    table = tf.constant(successors)

    def make_batch(index):
        seeds = tf.random.experimental.stateless_split(
            tf.stack([tf.cast(seed, tf.int64), index]), num=4)
        first = tf.random.stateless_uniform([batch_size], seeds[0], maxval=vocab, dtype=tf.int32)
        choice = tf.random.stateless_uniform([length - 1, batch_size], seeds[1],
                                             maxval=branching, dtype=tf.int32)
        is_noise = tf.random.stateless_uniform([length - 1, batch_size], seeds[2]) < noise
        random_token = tf.random.stateless_uniform([length - 1, batch_size], seeds[3],
                                                   maxval=vocab, dtype=tf.int32)

        def next_token(previous, inputs):
            c, n, r = inputs
            follow = tf.gather_nd(table, tf.stack([previous, c], axis=1))
            return tf.where(n, r, follow)

        rest = tf.scan(next_token, (choice, is_noise, random_token), initializer=first)
        return tf.transpose(tf.concat([first[tf.newaxis], rest], axis=0))

    return (tf.data.Dataset.range(first_batch, 2**62)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))


def tfrecord_batches(pattern, batch_size, length, vocab, input_context, shuffle_seed):
    """Windows of `length` tokens cut from concatenated documents, batched."""
    files = tf.io.gfile.glob(pattern)
    if not files:
        raise ValueError(f"--data={pattern!r} matches no files")
    ds = tf.data.Dataset.from_tensor_slices(sorted(files))
    if input_context is not None and input_context.num_input_pipelines > 1:
        pipelines = input_context.num_input_pipelines
        if len(files) < pipelines:  # a pipeline without a file would yield nothing
            raise ValueError(
                f"--data={pattern!r} matches {len(files)} file(s), fewer than the {pipelines} "
                "input pipelines (one per host): each pipeline reads whole files, so split the "
                f"data into at least {pipelines} files")
        ds = ds.shard(pipelines, input_context.input_pipeline_id)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.repeat().interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)

    def parse(record):
        tokens = tf.io.parse_single_example(
            record, {"tokens": tf.io.VarLenFeature(tf.int64)})["tokens"].values
        tokens = tf.cast(tokens, tf.int32)
        with tf.control_dependencies([tf.debugging.assert_less(
                tokens, vocab, message="token id >= --vocab in --data")]):
            return tf.identity(tokens)

    def windows(documents):
        flat = documents.flat_values  # 256 documents concatenated
        count = tf.shape(flat)[0] // length
        return tf.reshape(flat[: count * length], [count, length])

    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).ragged_batch(256).map(windows)
    ds = ds.unbatch()
    if shuffle_seed is not None:
        ds = ds.shuffle(10 * batch_size, seed=shuffle_seed)
    return ds.batch(batch_size, drop_remainder=True)


def make_dataset_fn(global_batch, seed_offset, first_step, shuffle):
    """A `dataset_fn(input_context)` for `distribute_datasets_from_function`.

    The stream starts where training step `first_step` needs it: each input
    pipeline feeds `replicas / pipelines` per-replica batches per step. (For
    --data the files are reshuffled with a new seed instead: a resumed run
    does not replay the same order, but the position is not exact.)
    """
    length = FLAGS.seq_len + 1

    def dataset_fn(input_context):
        batch = input_context.get_per_replica_batch_size(global_batch)
        pipeline = input_context.input_pipeline_id
        per_step = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        if FLAGS.data:
            ds = tfrecord_batches(FLAGS.data, batch, length, FLAGS.vocab, input_context,
                                  (FLAGS.seed + first_step + pipeline) if shuffle else None)
        else:
            successors = markov_chain(FLAGS.vocab, FLAGS.markov_branching, FLAGS.seed)
            ds = synthetic_batches(successors, batch, length, FLAGS.markov_noise,
                                   seed=FLAGS.seed * 1000 + seed_offset + pipeline,
                                   first_batch=first_step * per_step)
        return ds.prefetch(tf.data.AUTOTUNE)

    return dataset_fn


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def main(argv):
    del argv
    strategy, kind = common.make_strategy(FLAGS.tpu, FLAGS.cpu_devices)
    on_tpu = kind == "tpu"
    common.log(common.describe(strategy, kind))
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        raise ValueError(f"--batch_size={FLAGS.batch_size} must be a multiple of the "
                         f"{replicas} replicas")
    if FLAGS.mixed_precision == "bfloat16":
        tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    tf_keras.utils.set_random_seed(FLAGS.seed)
    # On TPU the whole replicated step is compiled by XLA; compiling the parts
    # again is pointless there. Elsewhere --jit_compile compiles the
    # per-replica forward/backward pass and Lion's per-variable updates.
    jit = FLAGS.jit_compile and not on_tpu

    with strategy.scope():
        model = build_model(FLAGS.vocab, FLAGS.seq_len, FLAGS.d_model, FLAGS.layers,
                            FLAGS.heads, FLAGS.mlp_dim or 4 * FLAGS.d_model)
        schedule = WarmupCosine(FLAGS.learning_rate, FLAGS.warmup_steps, FLAGS.train_steps,
                                FLAGS.final_lr_fraction)
        optimizer = tf_lion.Lion(
            learning_rate=schedule, beta_1=FLAGS.beta_1, beta_2=FLAGS.beta_2,
            weight_decay=FLAGS.weight_decay, sparse_mode=FLAGS.sparse_mode,
            momentum_dtype=FLAGS.momentum_dtype, jit_compile=jit)
        # No weight decay on biases, LayerNorm parameters and position embeddings.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "position"])
        optimizer.build(model.trainable_variables)  # slots now, so restore fills them directly
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        train_loss = tf_keras.metrics.Mean("train_loss", dtype=tf.float32)
        eval_loss = tf_keras.metrics.Mean("eval_loss", dtype=tf.float32)
    common.log(f"model parameters {model.count_params()} policy "
               f"{tf_keras.mixed_precision.global_policy().name} jit_compile {jit}")

    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step)
    manager = tf.train.CheckpointManager(checkpoint, FLAGS.model_dir,
                                         max_to_keep=FLAGS.max_checkpoints)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        common.log(f"restored from step {int(step.numpy())} checkpoint {manager.latest_checkpoint}")
    else:
        common.log(f"no checkpoint in {FLAGS.model_dir}: starting from step 0")
    start = int(step.numpy())

    if not FLAGS.data:
        successors = markov_chain(FLAGS.vocab, FLAGS.markov_branching, FLAGS.seed)
        common.log(f"synthetic data: markov chain vocab {FLAGS.vocab} branching "
                   f"{FLAGS.markov_branching} noise {FLAGS.markov_noise} entropy_floor "
                   f"{markov_entropy(successors, FLAGS.markov_noise):.4f} "
                   f"uniform_loss {math.log(FLAGS.vocab):.4f}")
    train_iterator = iter(strategy.distribute_datasets_from_function(
        make_dataset_fn(FLAGS.batch_size, seed_offset=0, first_step=start, shuffle=True)))
    eval_dataset = strategy.distribute_datasets_from_function(
        make_dataset_fn(FLAGS.batch_size, seed_offset=500, first_step=0, shuffle=False))

    def loss_fn(batch, training):
        logits = model(batch[:, :-1], training=training)
        per_token = tf_keras.losses.sparse_categorical_crossentropy(
            batch[:, 1:], logits, from_logits=True)
        return tf.reduce_mean(per_token)  # mean over this replica's tokens

    def forward_backward(batch):
        with tf.GradientTape() as tape:
            loss = loss_fn(batch, training=True)
            scaled = loss / replicas  # summed over replicas by apply_gradients: the mean
        return loss, tape.gradient(scaled, model.trainable_variables)

    if jit:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(batch):
        loss, grads = forward_backward(batch)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        train_loss.update_state(loss)

    @tf.function
    def train_loop(iterator, num_steps):
        for _ in tf.range(num_steps):
            strategy.run(replica_step, args=(next(iterator),))
        step.assign_add(tf.cast(num_steps, tf.int64))

    @tf.function
    def eval_loop(iterator, num_batches):
        for _ in tf.range(num_batches):
            strategy.run(lambda b: eval_loss.update_state(loss_fn(b, training=False)),
                         args=(next(iterator),))

    def evaluate():
        """Mean loss over the first --eval_batches batches of the eval stream."""
        eval_loss.reset_state()
        eval_loop(iter(eval_dataset), tf.constant(FLAGS.eval_batches, tf.int32))
        return float(eval_loss.result())

    writer = tf.summary.create_file_writer(os.path.join(FLAGS.model_dir, "train"))
    common.log(f"initial_loss {evaluate():.4f} step {start}")

    current = start
    while current < FLAGS.train_steps:
        next_checkpoint = (current // FLAGS.checkpoint_every + 1) * FLAGS.checkpoint_every
        num_steps = min(FLAGS.steps_per_loop, FLAGS.train_steps - current,
                        next_checkpoint - current)
        began = time.time()
        train_loop(train_iterator, tf.constant(num_steps, tf.int32))
        loss = float(train_loss.result())
        train_loss.reset_state()
        elapsed = time.time() - began
        current = int(step.numpy())
        lr = float(tf.convert_to_tensor(optimizer.learning_rate))  # the rate of the last step taken
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {current}")
        common.log(f"step {current} loss {loss:.4f} lr {lr:.6g} "
                   f"steps_per_sec {num_steps / elapsed:.1f}")
        with writer.as_default(step=current):
            common.write_scalar("loss", loss, current)
            common.write_scalar("learning_rate", lr, current)
            common.write_scalar("steps_per_sec", num_steps / elapsed, current)
        if current % FLAGS.checkpoint_every == 0 or current == FLAGS.train_steps:
            path = manager.save(checkpoint_number=current)
            writer.flush()
            common.log(f"saved checkpoint step {current} path {path}")
    writer.flush()

    common.log(f"final_loss {evaluate():.4f} step {int(step.numpy())}")


if __name__ == "__main__":
    app.run(main)
