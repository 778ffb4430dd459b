import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from caduceus import ops
from caduceus.configuration import CaduceusModelConfig
from caduceus.modeling import BiMamba, CaduceusForMaskedLM, conjoined_logits
from caduceus.tokenizer import COMPLEMENT_IDS, PAD_ID, CaduceusTokenizer, reverse_complement_ids
from tests.conftest import FIXTURES, REFERENCE_MODELS, load_reference, max_relative_error


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_matches_upstream_outputs(name, backend):
    model, io = load_reference(name)
    with torch.no_grad(), ops.use_backend(backend):
        out = model(io["input_ids"], output_hidden_states=True)
    assert out.logits.shape == (*io["input_ids"].shape, 16) and out.logits.dtype == torch.float32
    assert len(out.hidden_states) == model.config.n_layer + 1
    assert max_relative_error(out.logits, io["logits"]) <= 1e-5
    assert max_relative_error(out.last_hidden_state, io["last_hidden_state"]) <= 1e-5
    for k, hidden in enumerate(out.hidden_states):
        assert max_relative_error(hidden, io[f"hidden_states.{k}"]) <= 1e-5, k


def test_ps_without_the_half_swap_would_not_match():
    """Guards the test above: the fixture does tell the PS half-swap from its absence."""
    model, io = load_reference("ps_d32_n2")
    for layer in model.caduceus.backbone.layers:
        layer.rcps = False  # run the plain block on the 2d-wide tensor: no swap, no strand split
        layer.norm.weight = torch.nn.Parameter(layer.norm.weight.repeat(2))
    with torch.no_grad():
        logits = model(io["input_ids"]).logits
    assert max_relative_error(logits, io["logits"]) > 1e-2


@pytest.mark.parametrize("name", ["ph_d32_n2", "ps_d32_n2"])
def test_padding_mask_makes_rows_independent(name):
    model, _ = load_reference(name)
    tok = CaduceusTokenizer()
    sequences = ["ACGTTGCAAGT" * 3, "GATTACA", "CCCGGGAAATTTN" * 2]
    batch = tok(sequences)
    with torch.no_grad():
        together = model(batch.input_ids, batch.attention_mask, output_hidden_states=True)
        for i, sequence in enumerate(sequences):
            alone = model(tok([sequence]).input_ids, output_hidden_states=True)
            n = alone.logits.shape[1]
            assert max_relative_error(together.logits[i, -n:], alone.logits[0]) <= 1e-5
            for mixed, single in zip(together.hidden_states, alone.hidden_states, strict=True):
                assert max_relative_error(mixed[i, -n:], single[0]) <= 1e-5


def test_without_mask_padding_leaks_as_upstream():
    model, _ = load_reference("ph_d32_n2")
    batch = CaduceusTokenizer()(["ACGTACGTACGT" * 2, "GATTACA"])
    with torch.no_grad():
        padded = model(batch.input_ids).logits[1, -8:]
        alone = model(batch.input_ids[1:, -8:]).logits[0]
    assert max_relative_error(padded, alone) > 1e-4


def random_model(rcps: bool, d_model: int, n_layer: int, strategy: str, seed: int) -> CaduceusForMaskedLM:
    torch.manual_seed(seed)
    config = CaduceusModelConfig(d_model=d_model, n_layer=n_layer, rcps=rcps, bidirectional_strategy=strategy)
    model = CaduceusForMaskedLM(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # move every weight off its initial value so that each one matters
            p.add_(0.1 * torch.randn_like(p))
    return model


random_ids = st.lists(st.integers(7, 11), min_size=1, max_size=40)
shapes = st.tuples(st.sampled_from([8, 12]), st.integers(1, 2), st.sampled_from(["add", "ew_multiply"]),
                   st.integers(0, 1000))


@settings(max_examples=12, deadline=None)
@given(ids=random_ids, shape=shapes)
def test_ps_is_rc_equivariant(ids, shape):
    model = random_model(True, *shape)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(x)
        out_rc = model(reverse_complement_ids(x))
    d = model.config.d_model
    complement = torch.as_tensor(list(model.config.complement_map.values()))
    assert max_relative_error(out_rc.logits, out.logits.flip(1)[..., complement]) <= 1e-12
    hidden, hidden_rc = out.last_hidden_state, out_rc.last_hidden_state
    assert max_relative_error(hidden_rc, hidden.flip(dims=(1, 2))) <= 1e-12
    assert max_relative_error(hidden[..., :d], hidden_rc[..., d:].flip(dims=(1, 2))) <= 1e-12


@settings(max_examples=12, deadline=None)
@given(ids=random_ids, shape=shapes)
def test_conjoined_ph_is_rc_invariant(ids, shape):
    model = random_model(False, *shape)
    x = torch.tensor([ids])
    complement = torch.as_tensor(list(model.config.complement_map.values()))
    with torch.no_grad():
        forward = conjoined_logits(model, x)
        reverse = conjoined_logits(model, reverse_complement_ids(x)).flip(1)[..., complement]
        plain_rc = model(reverse_complement_ids(x)).logits.flip(1)[..., complement]
    assert max_relative_error(forward, reverse) <= 1e-12
    assert len(ids) < 3 or max_relative_error(model(x).logits, plain_rc) > 1e-6  # the Ph model alone is not


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_save_pretrained_matches_upstream_layout(name, tmp_path):
    model, _ = load_reference(name)
    model.save_pretrained(tmp_path)
    with safe_open(FIXTURES / name / "model.safetensors", "pt") as upstream, \
         safe_open(tmp_path / "model.safetensors", "pt") as ours:
        assert set(upstream.keys()) == set(ours.keys())
        for key in upstream.keys():
            a, b = upstream.get_tensor(key), ours.get_tensor(key)
            assert (a.shape, a.dtype) == (b.shape, b.dtype) and torch.equal(a, b), key
    upstream_config = json.loads((FIXTURES / name / "config.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text()) == upstream_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_tied_weights_stay_tied_after_loading():
    model, _ = load_reference("ps_d32_n2")
    mixer = model.caduceus.backbone.layers[0].mixer.submodule
    assert model.lm_head.weight is model.caduceus.backbone.embeddings.word_embeddings.weight
    assert mixer.mamba_rev.in_proj.weight is mixer.mamba_fwd.in_proj.weight
    assert mixer.mamba_rev.out_proj.weight is mixer.mamba_fwd.out_proj.weight


def test_backbone_only_checkpoint_loads(tmp_path):
    model, io = load_reference("ph_d32_n2")
    weights = load_file(FIXTURES / "ph_d32_n2" / "model.safetensors")
    save_file({k.removeprefix("caduceus."): v for k, v in weights.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((FIXTURES / "ph_d32_n2" / "config.json").read_text())
    backbone_only = CaduceusForMaskedLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(backbone_only(io["input_ids"]).logits, model(io["input_ids"]).logits)


def copy_fixture(tmp_path, name="ph_d32_n2"):
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes((FIXTURES / name / file).read_bytes())
    return tmp_path


def test_truncated_weights_give_clear_error(tmp_path):
    path = copy_fixture(tmp_path) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)


def test_missing_files_give_clear_error(tmp_path):
    (copy_fixture(tmp_path) / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    config = json.loads((copy_fixture(tmp_path) / "config.json").read_text())
    config["d_model"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape mismatch.*word_embeddings.weight"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    config["d_model"], config["n_layer"] = 32, 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing: caduceus.backbone.layers.2"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)


def test_nan_weights_are_refused(tmp_path):
    weights = load_file(copy_fixture(tmp_path) / "model.safetensors")
    weights["caduceus.backbone.norm_f.weight"][0] = float("nan")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="non-finite.*norm_f"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, _ = load_reference("ph_d32_n2")
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("caduceus.modeling.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        copy.deepcopy(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_masked_lm_loss_ignores_pad_and_never_nan():
    model, io = load_reference("ph_d32_n2")
    labels = torch.full_like(io["input_ids"], PAD_ID)
    out = model(io["input_ids"], labels=labels)
    assert out.loss.item() == 0.0
    labels[:, 5] = io["input_ids"][:, 5]
    loss = model(io["input_ids"], labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradients_match_reference_backend():
    model, io = load_reference("ps_d32_n2")
    labels = io["input_ids"].clone()
    grads = {}
    for backend in ("torch", "reference"):
        model.zero_grad()
        with ops.use_backend(backend):
            model(io["input_ids"], labels=labels).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["torch"].items():
        assert max_relative_error(g, grads["reference"][name]) <= 1e-4, name


@pytest.mark.parametrize("strategy", ["add", "ew_multiply"])
@pytest.mark.parametrize("bias", [False, True])
def test_tied_bimamba_computes_what_its_two_mixers_compute(strategy, bias):
    """The shared input projection (and, for ``add``, the one output projection of the sum) changes nothing."""
    torch.manual_seed(0)
    mixer = BiMamba(16, bidirectional_strategy=strategy, bias=bias).double()
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.ones(2, 9, 1, dtype=torch.float64)
    mask[1, :3] = 0
    with ops.use_backend("reference"):
        out, out_rev = mixer.mamba_fwd(hidden, mask), mixer.mamba_rev(hidden, mask, reverse=True)
        actual = mixer(hidden, mask)
    assert max_relative_error(actual, out + out_rev if strategy == "add" else out * out_rev) <= 1e-12


@pytest.fixture
def padded_channels():
    """The torch backend, asking the mixers to pad their channels to a multiple of 48 (the fixtures' 64 -> 96, 96
    stays), as the Triton backend asks for 16."""
    ops.register_backend(dataclasses.replace(ops.get_backend("cpu"), name="padded", channel_multiple=48))
    try:
        with ops.use_backend("padded"):
            yield
    finally:
        ops._BACKENDS.pop("padded")


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_padded_channels_match_upstream_outputs(name, padded_channels):
    model, io = load_reference(name)
    with torch.no_grad():
        out = model(io["input_ids"], output_hidden_states=True)
    assert max_relative_error(out.logits, io["logits"]) <= 1e-5
    for k, hidden in enumerate(out.hidden_states):
        assert max_relative_error(hidden, io[f"hidden_states.{k}"]) <= 1e-5, k


@pytest.mark.parametrize("bias", [False, True])
def test_padded_channels_change_no_gradient(bias):
    """Padding is exact: in float64, with a padding mask and biases, every output and gradient equals the unpadded
    model's; the mixer really ran on padded channels (its scan saw 96 of them)."""
    mixer = BiMamba(32, bias=bias).double()  # 64 channels
    hidden = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, 1, dtype=torch.float64)
    mask[1, :3] = 0
    widths, results = [], {}
    cpu = ops.get_backend("cpu")

    def scan(u: torch.Tensor, *args: object) -> torch.Tensor:
        widths.append(u.shape[-1])
        return cpu.selective_scan(u, *args)

    for multiple in (1, 48):
        backend = dataclasses.replace(cpu, name=f"m{multiple}", selective_scan=scan, channel_multiple=multiple)
        ops.register_backend(backend)
        try:
            with ops.use_backend(backend.name):
                out = mixer(hidden, mask)
                grads = torch.autograd.grad(out, [hidden, *mixer.parameters()], torch.cos(out))
        finally:
            ops._BACKENDS.pop(backend.name)
        results[multiple] = (out, *grads)
    assert widths == [64, 64, 96, 96]
    for padded, plain in zip(results[48], results[1], strict=True):
        assert max_relative_error(padded, plain) <= 1e-12


def test_complement_map_is_the_tokenizer_one():
    assert list(CaduceusModelConfig().complement_map.values())[:12] == COMPLEMENT_IDS.tolist()
