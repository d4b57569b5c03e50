"""tf-keras glue: `LossScaleOptimizer` checkpoints, SavedModel loading.

`install()`: lets `tf_keras.mixed_precision.LossScaleOptimizer` checkpoint a
wrapped Lion's slots.

tf_lion saves each momentum through TensorFlow's slot-variable protocol, keyed
to its variable: the checkpoint asks the object at the optimizer's position
for `get_slot_names()` and `get_slot(variable, name)`, and restores through
`_create_or_restore_slot_variable`. When a Lion is wrapped in tf-keras's
`LossScaleOptimizer` (the V3 class used with tf-keras optimizers), the wrapper
sits at that position and has neither method, so the momentum would silently
be left out of the checkpoint.

`install()` gives the wrapper class three methods that forward the protocol to
the wrapped optimizer when it is a tf_lion `Lion`. For any other wrapped
optimizer they behave as before (no slot names; restoring legacy slots raises
tf-keras's own error), so nothing changes for other optimizers.
"""

import tensorflow as tf
from tensorflow.python.saved_model import revived_types
from tensorflow.python.saved_model import save_context
from tensorflow.python.trackable import autotrackable
from tf_keras.src.mixed_precision import loss_scale_optimizer

__all__ = ["install", "register_saved_model_type", "RestoredLion"]


def _wraps_lion(wrapper):
    from tf_lion.optimizer import Lion

    return isinstance(getattr(wrapper, "_optimizer", None), Lion)


def install():
    cls = loss_scale_optimizer.LossScaleOptimizerV3
    if getattr(cls, "_tf_lion_slot_protocol", False):
        return
    original_restore = cls._create_or_restore_slot_variable

    def get_slot_names(self):
        return self._optimizer.get_slot_names() if _wraps_lion(self) else []

    def get_slot(self, var, slot_name):
        if _wraps_lion(self):
            return self._optimizer.get_slot(var, slot_name)
        raise KeyError(slot_name)

    def _create_or_restore_slot_variable(self, *args, **kwargs):
        if _wraps_lion(self):
            return self._optimizer._create_or_restore_slot_variable(*args, **kwargs)
        return original_restore(self, *args, **kwargs)

    cls.get_slot_names = get_slot_names
    cls.get_slot = get_slot
    cls._create_or_restore_slot_variable = _create_or_restore_slot_variable
    cls._tf_lion_slot_protocol = True


class RestoredLion(autotrackable.AutoTrackable):
    """What a tf_lion optimizer in a SavedModel loads as, when tf_lion is imported.

    It holds the saved counters and hyperparameter variables as attributes,
    and the momenta (and any other slots) of the SavedModel's checkpoint in
    `slots`: `(variable, slot name, slot variable)` triples, for inspection.
    Saved again, it writes them keyed to their variables, as a `Lion` does.
    To train on from a SavedModel, restore its checkpoint into a model and a
    `Lion` (README, "SavedModel").
    """

    def __init__(self):
        super().__init__()
        self._slot_triples = self._no_dependency([])  # saved as slots, not as a list

    @property
    def slots(self):
        return list(self._slot_triples)

    def get_slot_names(self):
        """The slot protocol, for checkpoints (none in a SavedModel's object graph)."""
        if save_context.in_save_context():
            return []
        return sorted({name for _, name, _ in self._slot_triples})

    def get_slot(self, var, slot_name):
        for variable, name, slot in self._slot_triples:
            if variable is var and name == slot_name:
                return slot
        raise KeyError(slot_name)

    def _create_or_restore_slot_variable(self, slot_variable_position, slot_name, variable,
                                         slot_variable_shape=None):
        """A slot from the checkpoint: a variable of its shape and dtype, then restored."""
        del slot_variable_shape
        for tensor in slot_variable_position.object_proto.attributes:
            if tensor.name == "VARIABLE_VALUE":
                key = tensor.checkpoint_key
                break
        else:
            return None
        checkpoint = slot_variable_position.checkpoint
        with tf.init_scope():
            slot = tf.Variable(tf.zeros(checkpoint.shape_map[key], checkpoint.dtype_map[key]),
                               trainable=False, name=slot_name)
        self._slot_triples.append((variable, slot_name, slot))
        return slot


_SAVED_MODEL_TYPE = "tf_lion.Lion"


def register_saved_model_type(lion_class):
    """Makes a SavedModel store a Lion under tf_lion's own type, not tf-keras's.

    tf-keras registers every tf-keras optimizer for SavedModel loading as its
    `RestoredOptimizer`, which raises on the first slot variable of the
    SavedModel's checkpoint ("restore a checkpoint from a legacy TF-Keras
    optimizer"): a trained model saved with `model.save(dir)` or
    `tf.saved_model.save` would not load. A SavedModel uses the first
    registration that matches, so tf_lion's goes first (for a Lion and for a
    `LossScaleOptimizer` around one, which holds its slots). Loaded where tf_lion
    is imported, the optimizer is a `RestoredLion`, which holds the slots;
    elsewhere (plain TensorFlow, TF Serving) a generic object, which skips
    them (TensorFlow logs it).
    """
    if _SAVED_MODEL_TYPE in revived_types.registered_identifiers():
        return
    tf.__internal__.saved_model.load.register_revived_type(
        _SAVED_MODEL_TYPE,
        lambda obj: isinstance(obj, (lion_class, RestoredLion)) or (
            isinstance(obj, loss_scale_optimizer.LossScaleOptimizerV3) and _wraps_lion(obj)),
        versions=[tf.__internal__.saved_model.load.VersionedTypeRegistration(
            object_factory=lambda proto: RestoredLion(),
            version=1, min_producer_version=1, min_consumer_version=1)],
    )
    order = revived_types._TYPE_IDENTIFIERS  # pylint: disable=protected-access
    order.remove(_SAVED_MODEL_TYPE)
    order.insert(0, _SAVED_MODEL_TYPE)
