"""The model configuration: every field of the published ``config.json``, with the published defaults."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from caduceus.tokenizer import COMPLEMENT_IDS

DEFAULT_SSM_CFG: dict[str, Any] = {
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "dt_rank": "auto",
    "dt_min": 0.001,
    "dt_max": 0.1,
    "dt_init": "random",
    "dt_scale": 1.0,
    "dt_init_floor": 1e-4,
    "conv_bias": True,
    "bias": False,
    "use_fast_path": True,
}
DEFAULT_INITIALIZER_CFG: dict[str, Any] = {
    "initializer_range": 0.02,
    "rescale_prenorm_residual": True,
    "n_residuals_per_layer": 1,
}


@dataclass
class CaduceusModelConfig:
    """Hyper-parameters of a Caduceus network (upstream ``CaduceusConfig``, ``model_type="caduceus"``).

    Defaults are those of the published checkpoints (the 1k, d_model 118 Ph model), not the upstream
    class defaults, which describe no released model. As upstream, ``vocab_size`` is padded up to a
    multiple of ``pad_vocab_size_multiple`` and ``complement_map`` extended with the identity.
    """

    d_model: int = 118
    n_layer: int = 4
    vocab_size: int = 16
    ssm_cfg: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SSM_CFG))
    rms_norm: bool = True
    residual_in_fp32: bool = False
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    norm_epsilon: float = 1e-5
    initializer_cfg: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_INITIALIZER_CFG))
    bidirectional: bool = True
    bidirectional_strategy: str = "add"
    bidirectional_weight_tie: bool = True
    rcps: bool = False
    complement_map: dict[int, int] | None = None

    def __post_init__(self) -> None:
        self.ssm_cfg = {**DEFAULT_SSM_CFG, **(self.ssm_cfg or {})}
        self.initializer_cfg = {**DEFAULT_INITIALIZER_CFG, **(self.initializer_cfg or {})}
        if self.bidirectional_strategy is None:
            self.bidirectional_strategy = "add"
        if self.bidirectional_strategy not in ("add", "ew_multiply"):
            raise ValueError(
                f"bidirectional_strategy must be 'add' or 'ew_multiply', got {self.bidirectional_strategy!r}"
            )
        if not self.rms_norm:
            raise ValueError("only rms_norm=True is supported (every published checkpoint uses RMSNorm)")
        for name in ("d_model", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        multiple = self.pad_vocab_size_multiple
        if self.vocab_size % multiple:
            self.vocab_size += multiple - self.vocab_size % multiple
        if self.complement_map is None:
            self.complement_map = {i: int(c) for i, c in enumerate(COMPLEMENT_IDS)}
        # JSON keys are strings; order by id rather than trusting insertion order.
        cmap = {int(k): int(v) for k, v in self.complement_map.items()}
        self.complement_map = {i: cmap.get(i, i) for i in range(self.vocab_size)}

    @property
    def d_inner(self) -> int:
        return self.ssm_cfg["expand"] * self.d_model

    @property
    def dt_rank(self) -> int:
        rank = self.ssm_cfg["dt_rank"]
        return math.ceil(self.d_model / 16) if rank == "auto" else int(rank)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states: 2·d_model for PS (both strands side by side)."""
        return 2 * self.d_model if self.rcps else self.d_model

    def to_dict(self) -> dict[str, Any]:
        """The published ``config.json`` layout (string keys in ``complement_map``, HF bookkeeping fields)."""
        data = asdict(self)
        data["complement_map"] = {str(k): v for k, v in sorted(self.complement_map.items())}
        data.update(
            architectures=["CaduceusForMaskedLM"],
            model_type="caduceus",
            torch_dtype="float32",
            transformers_version="4.38.1",
        )
        return dict(sorted(data.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaduceusModelConfig:
        """Build from a ``config.json`` dict, ignoring HF bookkeeping keys (``auto_map``, ``architectures``…)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CaduceusModelConfig:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON (line {error.lineno}): {error.msg}") from None
        if data.get("model_type", "caduceus") != "caduceus":
            raise ValueError(f"{path}: model_type is {data.get('model_type')!r}, expected 'caduceus'")
        return cls.from_dict(data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
