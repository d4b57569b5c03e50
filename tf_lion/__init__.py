"""tf_lion: the Lion optimizer for TensorFlow 2 / tf-keras.

`tf_lion.Lion` is the optimizer; `tf_lion.update` holds the update rules,
`tf_lion.checkpoint` migrates checkpoints of other Lions.
"""

from tf_lion import update
from tf_lion.optimizer import Lion
from tf_lion import checkpoint

__all__ = ["Lion", "update", "checkpoint"]
__version__ = "0.1.0"
