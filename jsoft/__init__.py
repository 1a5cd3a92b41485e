"""jsoft: stable softmax, sigmoid and cross-entropy kernels for JAX.

Drop-in replacements for ``jax.nn`` and ``optax`` that are never NaN where the
math is finite, carry the ``y - t`` gradient as a hand-written VJP rule, and
work under every JAX transformation.
"""

from jsoft._binary_cross_entropy import (
    sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy,
)
from jsoft._checks import checked as checked
from jsoft._cross_entropy import (
    softmax_cross_entropy as softmax_cross_entropy,
)
from jsoft._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,  # noqa: E501
)
from jsoft._distillation import distillation_loss as distillation_loss
from jsoft._kl import kl_divergence as kl_divergence
from jsoft._kl import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from jsoft._linear_cross_entropy import (
    linear_cross_entropy as linear_cross_entropy,
)
from jsoft._linear_distillation import (
    linear_distillation_loss as linear_distillation_loss,
)
from jsoft._linear_post import linear_policy_loss as linear_policy_loss
from jsoft._linear_post import (
    linear_preference_loss as linear_preference_loss,
)
from jsoft._policy import PolicyStats as PolicyStats
from jsoft._policy import policy_loss as policy_loss
from jsoft._preference import PreferenceStats as PreferenceStats
from jsoft._preference import preference_loss as preference_loss
from jsoft._sigmoid import log_sigmoid as log_sigmoid
from jsoft._sigmoid import sigmoid as sigmoid
from jsoft._softmax import log_softmax as log_softmax
from jsoft._softmax import logsumexp as logsumexp
from jsoft._softmax import softmax as softmax
from jsoft._stats import TokenStats as TokenStats

__version__ = "0.1.0"

__all__ = [
    "PolicyStats",
    "PreferenceStats",
    "TokenStats",
    "checked",
    "distillation_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_policy_loss",
    "linear_preference_loss",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "policy_loss",
    "preference_loss",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
