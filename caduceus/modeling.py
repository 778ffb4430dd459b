"""The Caduceus network in plain PyTorch, read top to bottom.

Embedding → n_layer × (fused add + RMSNorm → BiMamba) → final add + RMSNorm → tied masked-LM head.
Ph models run this on one strand. PS models (``rcps=True``) carry both strands side by side in 2·d_model
channels and share every weight between them, which makes them exactly reverse-complement equivariant.

Parameter names, shapes and the order of operations follow the upstream code (kuleshov-group/caduceus
with mamba_ssm 1.2), so published checkpoints load unchanged and give the same numbers. The kernels
(scan, conv, norm) come from ``caduceus.ops``, which picks a backend for the device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from caduceus import ops
from caduceus.configuration import CaduceusModelConfig
from caduceus.files import atomic_write
from caduceus.tokenizer import PAD_ID, reverse_complement_ids

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def pad_channels(t: torch.Tensor, pad: int, dim: int = 0, value: float = 0.0) -> torch.Tensor:
    """``t`` with ``pad`` more entries of ``value`` along ``dim`` (one op: the model pads its weights every call)."""
    if pad == 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, pad], value=value)


def rc_hidden(x: torch.Tensor) -> torch.Tensor:
    """Reverse complement of a hidden tensor (B, L, C): reverse the sequence and the channels."""
    return x.flip(dims=(-2, -1))


def dt_bias(uniform: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's dt_proj bias from uniform samples in [0, 1): the inverse softplus of a log-uniform step in
    [dt_min, dt_max] (at least ``floor``), so that softplus(bias) starts as that step."""
    dt = torch.exp(uniform * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class RMSNorm(nn.Module):
    """RMSNorm with the residual add fused in front: returns (norm(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, residual, self.eps)


class Mamba(nn.Module):
    """The Mamba-1 mixer (mamba_ssm ``Mamba`` v1.2). ``reverse=True`` runs it anti-causally, which equals
    flipping the input, running it and flipping the output back, without the copies.

    Between the projections the channels are padded with zeros to the multiple the kernels want
    (``ops.channel_multiple``; 236 -> 240 on Triton): zero rows of in_proj and of the conv make the padded channels'
    conv output and gate zero, so they add nothing, and zero columns of x_proj and out_proj ignore them."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,  # accepted for config compatibility; the backend decides
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        self.d_inner = d_inner
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init_dt(dt_min, dt_max, dt_init, dt_scale, dt_init_floor)

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, dt_init: str, dt_scale: float, dt_init_floor: float) -> None:
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.dt_proj.bias.copy_(dt_bias(torch.rand(self.dt_proj.bias.shape), dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, reverse: bool = False
    ) -> torch.Tensor:
        return self.project_out(self.mix(*self.project_in(hidden), mask, reverse))

    def project_in(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj as two matmuls, so that x and z come out contiguous (the CPU kernels then read them in place),
        each with its channels padded (see the class)."""
        pad = -self.d_inner % ops.channel_multiple(hidden.device)
        weights = self.in_proj.weight.chunk(2)
        biases = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        x, z = (F.linear(hidden, pad_channels(w, pad), None if b is None else pad_channels(b, pad))
                for w, b in zip(weights, biases))
        return x, z

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        return F.linear(y, pad_channels(self.out_proj.weight, y.shape[-1] - self.d_inner, dim=1), self.out_proj.bias)

    def mix(
        self, x: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None, reverse: bool = False
    ) -> torch.Tensor:
        """Everything between the two projections: conv, SiLU, x_proj, dt_proj and the gated scan, on x and z as
        project_in gives them (channels padded, see the class)."""
        pad = x.shape[-1] - self.d_inner
        if mask is not None:  # padding contributes nothing: zero conv input and scan input there
            x = x * mask
        conv_bias = None if self.conv1d.bias is None else pad_channels(self.conv1d.bias, pad)
        x = ops.causal_conv1d(x, pad_channels(self.conv1d.weight, pad), conv_bias, reverse, silu=True)
        if mask is not None:
            x = x * mask
        x_dbl = F.linear(x, pad_channels(self.x_proj.weight, pad, dim=1))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, pad_channels(self.dt_proj.weight, pad))  # the bias is added inside the scan, in fp32
        A = pad_channels(-torch.exp(self.A_log.float()), pad, value=-1.0)
        D, dt_bias = (pad_channels(t.float(), pad) for t in (self.D, self.dt_proj.bias))
        return ops.selective_scan(x, dt, A, B, C, D, z, dt_bias, delta_softplus=True, reverse=reverse)


class BiMamba(nn.Module):
    """``BiMambaWrapper``: a forward Mamba plus an anti-causal one, combined by ``add`` or ``ew_multiply``.
    With weight tying the reverse mixer shares the forward one's in/out projections; then the input
    projection is computed once for both, and with ``add`` the output projection too (it is linear)."""

    def __init__(
        self,
        d_model: int,
        bidirectional: bool = True,
        bidirectional_strategy: str = "add",
        bidirectional_weight_tie: bool = True,
        **ssm_cfg: object,
    ) -> None:
        super().__init__()
        self.strategy = bidirectional_strategy
        self.mamba_fwd = Mamba(d_model, **ssm_cfg)
        self.mamba_rev = Mamba(d_model, **ssm_cfg) if bidirectional else None
        self.tied = self.mamba_rev is not None and bidirectional_weight_tie
        if self.tied:
            for name in ("in_proj", "out_proj"):
                rev, fwd = getattr(self.mamba_rev, name), getattr(self.mamba_fwd, name)
                rev.weight = fwd.weight
                rev.bias = fwd.bias

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        fwd, rev = self.mamba_fwd, self.mamba_rev
        if rev is None:
            return fwd(hidden, mask)
        if not self.tied:
            out, out_rev = fwd(hidden, mask), rev(hidden, mask, reverse=True)
        else:
            x, z = fwd.project_in(hidden)
            y, y_rev = fwd.mix(x, z, mask), rev.mix(x, z, mask, reverse=True)
            if self.strategy == "add":  # one projection of the sum; the bias, if any, counts once per direction
                out = fwd.project_out(y + y_rev)
                return out if fwd.out_proj.bias is None else out + fwd.out_proj.bias
            out, out_rev = fwd.project_out(y), fwd.project_out(y_rev)
        return out + out_rev if self.strategy == "add" else out * out_rev


class RCPSWrapper(nn.Module):
    """Runs one mixer on both strands: ``cat[M(x1), RC(M(RC(x2)))]`` for the two channel halves."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rc_mask = None if mask is None else mask.flip(-2)
        return torch.cat([self.submodule(x1, mask), rc_hidden(self.submodule(rc_hidden(x2), rc_mask))], dim=-1)


class CaduceusBlock(nn.Module):
    """Pre-norm residual block: ``residual = hidden + residual; hidden = mixer(norm(residual))``.

    For PS the two strands go through the same norm, and, as in every published PS checkpoint (upstream
    ``RCPSMambaBlock`` with ``fused_add_norm=True``), the halves are swapped before the add+norm: the
    second half takes the forward slot and the reverse complement of the first half the RC slot.
    """

    def __init__(self, config: CaduceusModelConfig) -> None:
        super().__init__()
        self.rcps = config.rcps
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        mixer = BiMamba(
            config.d_model,
            bidirectional=config.bidirectional,
            bidirectional_strategy=config.bidirectional_strategy,
            bidirectional_weight_tie=config.bidirectional_weight_tie,
            **config.ssm_cfg,
        )
        self.mixer = RCPSWrapper(mixer) if config.rcps else mixer

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rcps:
            normed, residual = self.norm(hidden, residual)
        else:
            h1, h2 = hidden.chunk(2, dim=-1)
            r1, r2 = (None, None) if residual is None else residual.chunk(2, dim=-1)
            normed_fwd, residual_fwd = self.norm(h2, r2)  # the half-swap
            normed_rc, residual_rc = self.norm(rc_hidden(h1), None if r1 is None else rc_hidden(r1))
            normed = torch.cat([normed_fwd, rc_hidden(normed_rc)], dim=-1)
            residual = torch.cat([residual_fwd, rc_hidden(residual_rc)], dim=-1)
        if self.residual_in_fp32:
            residual = residual.float()
        return self.mixer(normed, mask), residual


class RCPSEmbedding(nn.Module):
    """Embeds both strands: ``cat[E(ids), RC(E(rc(ids)))]``, width 2·d_model."""

    def __init__(self, vocab_size: int, d_model: int, complement_map: dict[int, int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.register_buffer(
            "complement_map", torch.tensor([complement_map[i] for i in range(vocab_size)], dtype=torch.long)
        )

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rc_ids = self.complement_map[input_ids.flip(-1)]
        return torch.cat([self.embedding(input_ids), rc_hidden(self.embedding(rc_ids))], dim=-1)


class CaduceusEmbeddings(nn.Module):
    def __init__(self, config: CaduceusModelConfig) -> None:
        super().__init__()
        if config.rcps:
            self.word_embeddings = RCPSEmbedding(config.vocab_size, config.d_model, config.complement_map)
        else:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class CaduceusBackbone(nn.Module):
    """Upstream ``CaduceusMixerModel``: embeddings, the blocks and the final add + norm."""

    def __init__(self, config: CaduceusModelConfig) -> None:
        super().__init__()
        self.rcps = config.rcps
        self.residual_in_fp32 = config.residual_in_fp32
        self.gradient_checkpointing = False
        self.embeddings = CaduceusEmbeddings(config)
        self.layers = nn.ModuleList(CaduceusBlock(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden = self.embeddings(input_ids)
        mask = None if attention_mask is None else attention_mask.to(hidden.dtype).unsqueeze(-1)
        all_hidden: list[torch.Tensor] = []
        residual = None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, mask, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, mask)
        if not self.rcps:
            hidden, _ = self.norm_f(hidden, residual)
        else:
            h1, h2 = hidden.chunk(2, dim=-1)
            r1, r2 = residual.chunk(2, dim=-1)
            out_rc, _ = self.norm_f(rc_hidden(h2), rc_hidden(r2))
            hidden = torch.cat([self.norm_f(h1, r1)[0], rc_hidden(out_rc)], dim=-1)
        if output_hidden_states:
            all_hidden.append(hidden)
        return hidden, (tuple(all_hidden) if output_hidden_states else None)


class CaduceusModel(nn.Module):
    """Upstream ``Caduceus`` (the AutoModel): the backbone, returning hidden states."""

    def __init__(self, config: CaduceusModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = CaduceusBackbone(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        return self.backbone(input_ids, attention_mask, output_hidden_states)


class RCPSLMHead(nn.Module):
    """Masked-LM head for PS: ``x1 Wᵀ + flip_C(x2) W[cm]ᵀ``, so logits are RC-equivariant."""

    def __init__(self, vocab_size: int, d_model: int, complement_map: dict[int, int]) -> None:
        super().__init__()
        self.register_buffer(
            "complement_map", torch.tensor([complement_map[i] for i in range(vocab_size)], dtype=torch.long)
        )
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.lm_head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.linear(x1, self.weight) + F.linear(x2.flip(-1), self.weight[self.complement_map])


@dataclass
class CaduceusOutput:
    """What the model returns; ``hidden_states`` has n_layer + 1 entries (upstream meaning)."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    loss: torch.Tensor | None = None


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = PAD_ID) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions; 0 (not NaN) when no position is labelled."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum")
    return loss / (labels != ignore_index).sum().clamp(min=1)


def conjoined_logits(
    model: CaduceusForMaskedLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked-LM logits that treat both strands alike, in forward coordinates.

    PS models are RC-equivariant by construction, so one pass suffices. Ph models are conjoined post
    hoc, as in the paper: the reverse-complement strand is run, mapped back and averaged in.
    """
    forward = model(input_ids, attention_mask).logits
    if model.config.rcps:
        return forward
    complement = torch.tensor([model.config.complement_map[i] for i in range(model.config.vocab_size)],
                              device=input_ids.device)
    rc_mask = None if attention_mask is None else attention_mask.flip(-1)
    rc = model(reverse_complement_ids(input_ids), rc_mask).logits.flip(1)[..., complement]
    return (forward + rc) / 2


class CaduceusForMaskedLM(nn.Module):
    """Caduceus with its tied masked-LM head, loadable from and savable to the published layout."""

    def __init__(self, config: CaduceusModelConfig) -> None:
        super().__init__()
        self.config = config
        self.caduceus = CaduceusModel(config)
        if config.rcps:
            self.lm_head = RCPSLMHead(config.vocab_size, config.d_model, config.complement_map)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """mamba_ssm ``_init_weights``: zero Linear biases (except dt), N(0, 0.02) embeddings, and out_proj
        rescaled by 1/sqrt(n_layer) as GPT-2 does for pre-norm residual branches."""
        cfg = self.config.initializer_cfg
        if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", 0):
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=cfg["initializer_range"])
        if cfg["rescale_prenorm_residual"] and isinstance(module, Mamba):
            nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                module.out_proj.weight /= math.sqrt(cfg["n_residuals_per_layer"] * self.config.n_layer)

    def tie_weights(self) -> None:
        """The head shares the embedding matrix (and BiMamba its in/out projections, tied at build)."""
        embedding = self.caduceus.backbone.embeddings.word_embeddings
        if self.config.rcps:
            self.lm_head.lm_head.weight = embedding.weight
        else:
            self.lm_head.weight = embedding.weight

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> CaduceusOutput:
        hidden, all_hidden = self.caduceus(input_ids, attention_mask, output_hidden_states)
        logits = self.lm_head(hidden).float()
        loss = None if labels is None else masked_lm_loss(logits, labels)
        return CaduceusOutput(logits=logits, last_hidden_state=hidden, hidden_states=all_hidden, loss=loss)

    # ----- checkpoints in the published layout -----

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` as upstream ``save_pretrained`` does: tied
        weights stored once, under their first name. Each file is written whole or not at all."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        tensors = {}
        for name, tensor in self.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().to("cpu").contiguous()
        atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(self.config.to_json_string()))

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, device: torch.device | str | None = None, **hub_kwargs: object
    ) -> CaduceusForMaskedLM:
        """Load a checkpoint: a local directory, a published or bundled model name, or a HF repo id.

        Backbone-only checkpoints (keys ``backbone.*``) load too, with the head tied to the embedding.
        Any problem (missing or corrupt file, keys or shapes that do not fit) raises before a model is
        returned; a model is never half-loaded.
        """
        from caduceus.hub import resolve_model_dir

        directory = resolve_model_dir(name_or_path, **hub_kwargs)
        config = CaduceusModelConfig.from_json_file(directory / CONFIG_NAME)
        model = cls(config)
        model.load_state_dict_checked(load_weights(directory / WEIGHTS_NAME), source=directory / WEIGHTS_NAME)
        model.eval()
        return model.to(device) if device is not None else model

    def load_state_dict_checked(self, state_dict: dict[str, torch.Tensor], source: str | os.PathLike = "") -> None:
        """Load published-layout weights, checking names and shapes first and saying what does not fit."""
        if not any(k.startswith("caduceus.") for k in state_dict):
            state_dict = {f"caduceus.{k}": v for k, v in state_dict.items()}  # backbone-only checkpoint
        expected = self.state_dict()
        tied = _tied_names(self)
        missing = sorted(set(expected) - set(state_dict) - tied)
        unexpected = sorted(set(state_dict) - set(expected))
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
        problems = [("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)]
        report = "; ".join(f"{what}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"
                           for what, items in problems if items)
        if report:
            raise ValueError(f"{source}: weights do not fit the config ({report})")
        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{source}: non-finite values in {', '.join(bad[:5])}")
        self.load_state_dict(state_dict, strict=False)
        self.tie_weights()


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that alias an earlier tensor (not stored in published files)."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.add(tensor.data_ptr())
    return tied


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing, truncated or corrupt file into a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
