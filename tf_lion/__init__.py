"""tf_lion: the Lion optimizer for TensorFlow 2 / tf-keras.

`tf_lion.Lion` is the optimizer; `tf_lion.update` holds the update rules.
"""

from tf_lion import update
from tf_lion.optimizer import Lion

__all__ = ["Lion", "update"]
__version__ = "0.1.0"
