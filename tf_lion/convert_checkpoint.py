"""Command line: convert a tf-keras Lion checkpoint into tf_lion's layout.

    python -m tf_lion.convert_checkpoint SRC --inspect
    python -m tf_lion.convert_checkpoint SRC --inspect --model_fn my_models:build
    python -m tf_lion.convert_checkpoint SRC DST --model_fn my_models:build

A checkpoint written by `tf.train.Checkpoint(model=model,
optimizer=tf_keras.optimizers.Lion(...))` keeps momentum j by position; it does
not say which variable it belongs to (see `tf_lion.checkpoint`). Converting
needs the model, so `--model_fn MODULE:FUNCTION` names a zero-argument
function returning the same tf-keras model, built. The momenta, the step
counter and the EMA averages are converted; the learning rate written is the
source's saved one unless `--learning_rate` is given, and none is written when
the source has none (a schedule): a later restore keeps the restoring
optimizer's own. `--inspect` lists what the
checkpoint holds, without a model, or with one to show the variable each
momentum maps to.
"""

import argparse
import importlib
import sys

import tensorflow as tf

from tf_lion import checkpoint as checkpoint_lib
from tf_lion.optimizer import Lion

_PROG = "python -m tf_lion.convert_checkpoint"


class _Error(Exception):
    """A failure to report in one line, without a traceback."""


def _parser():
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Convert a tf-keras Lion checkpoint (state by list position) into tf_lion's "
                    "layout (momenta as slots of their variables).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"examples:\n  {_PROG} ckpts/ckpt-3 --inspect\n"
               f"  {_PROG} ckpts/ckpt-3 converted/ckpt --model_fn my_models:build",
    )
    parser.add_argument("src", help="tf-keras Lion checkpoint: a prefix (ckpts/ckpt-3) or a "
                                    "directory (its latest checkpoint)")
    parser.add_argument("dst", nargs="?", help="prefix to write the tf_lion checkpoint to")
    parser.add_argument("--inspect", action="store_true",
                        help="list the momenta (index, shape, dtype) and exit; with --model_fn "
                             "also the variable each maps to")
    parser.add_argument("--model_fn", metavar="MODULE:FUNCTION",
                        help="zero-argument function returning the built tf-keras model the "
                             "checkpoint was saved from (its trainable variables in the same "
                             "order); MODULE must be importable (PYTHONPATH)")
    parser.add_argument("--momentum_dtype", default=None,
                        help="dtype of the tf_lion momentum slots, e.g. bfloat16 (default: each "
                             "variable's dtype); restore later with the same momentum_dtype")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="learning rate stored in the new checkpoint (default: the source's "
                             "saved one; none if the source has none, e.g. a schedule)")
    parser.add_argument("--drop_ema", action="store_true",
                        help="do not carry EMA averages over (kept by default if the source "
                             "used use_ema=True)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint at DST")
    return parser


def load_model(spec):
    """Calls the `MODULE:FUNCTION` named by `spec` and checks that it returns a built model."""
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise _Error(f"--model_fn must look like MODULE:FUNCTION, got {spec!r}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise _Error(f"--model_fn: cannot import module {module_name!r} ({error}); is it on "
                     "PYTHONPATH?") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise _Error(f"--model_fn: module {module_name!r} has no function {fn_name!r}.")
    try:
        model = fn()
    except Exception as error:  # the user's code: report it, whatever it is
        raise _Error(f"--model_fn {spec} raised {type(error).__name__}: {error}") from None
    if not hasattr(model, "trainable_variables"):
        raise _Error(f"--model_fn {spec} returned {type(model).__name__}, not a tf-keras model.")
    if not model.trainable_variables:
        raise _Error(f"--model_fn {spec} returned a model with no trainable variables; build it "
                     "(e.g. give its input shape) before returning it.")
    return model


def _format_shape(shape):
    return "[" + ", ".join(str(d) for d in shape) + "]"


def inspect(state, model=None, out=sys.stdout):
    """Prints the momenta of `state`; with `model`, the variable each maps to."""
    print(f"checkpoint:    {state.prefix}", file=out)
    print(f"optimizer:     '{state.optimizer_path}' (tf-keras Lion layout)", file=out)
    if state.iterations is not None:
        step = checkpoint_lib.read_value(state.prefix, state.iterations)
        print(f"iterations:    {int(step)}", file=out)
    if state.learning_rate is not None:
        lr = checkpoint_lib.read_value(state.prefix, state.learning_rate)
        print(f"learning_rate: {float(lr):.6g}", file=out)
    ema = "no" if state.averages is None else f"yes ({len(state.averages)} averages)"
    print(f"ema:           {ema}", file=out)
    print(f"momenta:       {len(state.momenta)}", file=out)
    variables = list(model.trainable_variables) if model is not None else []
    if model is not None and len(variables) != len(state.momenta):
        print(f"WARNING: the model has {len(variables)} trainable variables, the checkpoint "
              f"{len(state.momenta)} momenta.", file=out)
    for j, tensor in enumerate(state.momenta):
        line = f"  {j:>4}  {_format_shape(tensor.shape):<16} {tensor.dtype.name:<9} {tensor.key}"
        if j < len(variables):
            var = variables[j]
            fits = "ok" if tuple(var.shape) == tensor.shape else "SHAPE MISMATCH"
            line += f"  -> {var.name} {_format_shape(var.shape)} {fits}"
        print(line, file=out)


def convert(args):
    """Converts `args.src` to `args.dst`; returns the path written."""
    dst = str(args.dst)
    if tf.io.gfile.exists(dst + ".index") and not args.overwrite:
        raise _Error(f"'{dst}' already exists; pass --overwrite to replace it.")
    state = checkpoint_lib.read_tf_keras_lion_state(args.src)
    model = load_model(args.model_fn)
    lr = args.learning_rate
    if lr is None and state.learning_rate is not None:
        lr = float(checkpoint_lib.read_value(state.prefix, state.learning_rate))
    # Without a learning rate to carry over, the optimizer gets a callable one,
    # which is no variable: the checkpoint holds no learning rate to restore.
    optimizer = Lion(learning_rate=(lambda: 0.0) if lr is None else lr,
                     momentum_dtype=args.momentum_dtype,
                     use_ema=state.averages is not None and not args.drop_ema)
    path = checkpoint_lib.convert_tf_keras_lion_checkpoint(state.prefix, dst, model, optimizer)
    written = ("none (the source has none; pass --learning_rate to write one)" if lr is None
               else f"{lr:.6g}")
    print(f"wrote {path}: {len(state.momenta)} momenta, iterations "
          f"{int(optimizer.iterations.numpy())}, learning_rate {written}, "
          f"ema {optimizer.use_ema}")
    return path


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.inspect and args.dst:
        parser.error("--inspect takes no DST")
    if not args.inspect and not args.dst:
        parser.error("DST is required (or pass --inspect)")
    if not args.inspect and not args.model_fn:
        parser.error("--model_fn MODULE:FUNCTION is required to convert: a checkpoint does not "
                     "hold the model's code")
    try:
        if args.inspect:
            model = load_model(args.model_fn) if args.model_fn else None
            inspect(checkpoint_lib.read_tf_keras_lion_state(args.src), model)
        else:
            convert(args)
    except (_Error, ValueError, TypeError, FileNotFoundError, tf.errors.OpError) as error:
        message = error.message if isinstance(error, tf.errors.OpError) else str(error)
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
