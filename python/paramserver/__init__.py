"""paramserver: a parameter server for distributed machine learning.

A C++ core holds sharded parameter blocks and applies ``torch.optim``-exact updates; servers expose
it over gRPC; workers push gradients and pull weights through :func:`connect`.
"""

from paramserver import init
from paramserver.optim import SGD, Adagrad, Adam, AdamW, Optimizer

__version__ = "0.1.0"

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "Optimizer", "init", "__version__"]
