"""Built-in mixers; importing this package registers them."""

from __future__ import annotations

from zoo.mixers.attention import Attention
from zoo.mixers.gla import GLA
from zoo.mixers.mamba import Mamba
from zoo.mixers.mamba2 import Mamba2

__all__ = ["Attention", "GLA", "Mamba", "Mamba2"]
