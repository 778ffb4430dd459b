"""Where weights come from: local directories, bundled models, the Hugging Face cache (offline) and
downloads (mocked, and through a local fake hub server to check that a failed transfer leaves nothing)."""

import hashlib
import http.server
import shutil
import threading

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hf_constants

from caduceus import hub
from caduceus.hub import MODEL_FILES, PUBLISHED_MODELS, ModelInfo, WeightsNotFoundError, place_in_cache
from caduceus.modeling import CaduceusForMaskedLM
from tests.conftest import FIXTURES

PH_FIXTURE = FIXTURES / "ph_d32_n2"
D118_PH = "caduceus-ph-4L-seqlen-1k-d118"
D118_PH_REPO = "kuleshov-group/caduceus-ph_seqlen-1k_d_model-118_n_layer-4_lr-8e-3"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable once, at import)."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_six_published_names_and_their_repos():
    expected = {
        "caduceus-ph-4L-seqlen-1k-d118": ("kuleshov-group/caduceus-ph_seqlen-1k_d_model-118_n_layer-4_lr-8e-3", 1024),
        "caduceus-ph-4L-seqlen-1k-d256": ("kuleshov-group/caduceus-ph_seqlen-1k_d_model-256_n_layer-4_lr-8e-3", 1024),
        "caduceus-ph-16L-seqlen-131k-d256": ("kuleshov-group/caduceus-ph_seqlen-131k_d_model-256_n_layer-16", 131072),
        "caduceus-ps-4L-seqlen-1k-d118": ("kuleshov-group/caduceus-ps_seqlen-1k_d_model-118_n_layer-4_lr-8e-3", 1024),
        "caduceus-ps-4L-seqlen-1k-d256": ("kuleshov-group/caduceus-ps_seqlen-1k_d_model-256_n_layer-4_lr-8e-3", 1024),
        "caduceus-ps-16L-seqlen-131k-d256": ("kuleshov-group/caduceus-ps_seqlen-131k_d_model-256_n_layer-16", 131072),
    }
    assert {name: (info.repo_id, info.input_size) for name, info in PUBLISHED_MODELS.items()} == expected
    for name, info in PUBLISHED_MODELS.items():
        assert f"{info.n_layer}L" in name and name.endswith(f"d{info.embedding_size}")
        # the sizes parsed from a repo id (for repo ids outside the table) agree with the table
        assert hub.model_info(info.repo_id) == info


def test_model_info_of_directories_and_unknown_names(tmp_path):
    assert hub.model_info(PH_FIXTURE) == ModelInfo(None, 32, 2)  # input size unknown for a plain directory
    named = tmp_path / "caduceus-ps_seqlen-131k_d_model-256_n_layer-16"
    shutil.copytree(PH_FIXTURE, named)
    assert hub.model_info(named).input_size == 131072
    assert hub.model_info("caduceus-pq-4L-seqlen-1k-d118") is None
    assert hub.model_info("some-org/not-a-caduceus-repo") is None


def test_local_directory_is_used_as_is_and_must_be_complete(tmp_path):
    assert hub.resolve_model_dir(PH_FIXTURE) == PH_FIXTURE
    (tmp_path / "config.json").write_bytes((PH_FIXTURE / "config.json").read_bytes())
    with pytest.raises(WeightsNotFoundError, match="model.safetensors"):
        hub.resolve_model_dir(tmp_path)


def test_a_name_that_is_nothing_is_a_clear_error():
    with pytest.raises(WeightsNotFoundError, match="neither an existing directory.*caduceus-ph-4L-seqlen-1k-d118"):
        hub.resolve_model_dir("no-such-model")


def test_bundled_model_resolves_without_the_hub(tmp_path, monkeypatch):
    shutil.copytree(PH_FIXTURE, tmp_path / "caduceus-tiny")
    monkeypatch.setattr(hub, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setitem(hub.BUNDLED_MODELS, "caduceus-tiny", ModelInfo(1024, 32, 2))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("must not download"))
    assert hub.resolve_model_dir("caduceus-tiny") == tmp_path / "caduceus-tiny"
    assert "caduceus-tiny" in hub.available_models()[: len(hub.BUNDLED_MODELS)]  # bundled names come first
    model = CaduceusForMaskedLM.from_pretrained("caduceus-tiny")
    assert same_weights(model, CaduceusForMaskedLM.from_pretrained(PH_FIXTURE))


def test_place_in_cache_writes_the_hub_cache_layout(tmp_path):
    snapshot = place_in_cache(PH_FIXTURE, D118_PH_REPO, cache_dir=tmp_path)
    repo_dir = tmp_path / "models--kuleshov-group--caduceus-ph_seqlen-1k_d_model-118_n_layer-4_lr-8e-3"
    assert snapshot.parent == repo_dir / "snapshots"
    assert (repo_dir / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    for name in MODEL_FILES:
        assert (snapshot / name).read_bytes() == (PH_FIXTURE / name).read_bytes()
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(MODEL_FILES)  # no temporary left


@pytest.mark.parametrize("local_files_only", [None, True])
def test_published_name_loads_from_the_hub_cache_offline(tmp_path, offline, local_files_only):
    snapshot = place_in_cache(PH_FIXTURE, D118_PH_REPO, cache_dir=tmp_path)
    found = hub.resolve_model_dir(D118_PH, cache_dir=tmp_path, local_files_only=local_files_only)
    assert found == snapshot
    model = CaduceusForMaskedLM.from_pretrained(D118_PH, cache_dir=tmp_path)
    assert same_weights(model, CaduceusForMaskedLM.from_pretrained(PH_FIXTURE))
    # a repo id works the same way, and so does a revision that names a cached ref
    place_in_cache(PH_FIXTURE, D118_PH_REPO, cache_dir=tmp_path, revision="v1")
    assert hub.resolve_model_dir(D118_PH_REPO, cache_dir=tmp_path, revision="v1") == snapshot


def test_missing_from_the_cache_offline_names_the_files_and_how_to_place_them(tmp_path, offline):
    with pytest.raises(WeightsNotFoundError) as error:
        hub.resolve_model_dir("caduceus-ps-4L-seqlen-1k-d256", cache_dir=tmp_path)
    message = str(error.value)
    repo = PUBLISHED_MODELS["caduceus-ps-4L-seqlen-1k-d256"].repo_id
    for needle in ("config.json", "model.safetensors", repo, "HF_HUB_OFFLINE", f"hf download {repo}",
                   "place_in_cache", str(tmp_path)):
        assert needle in message


def test_download_passes_the_hub_options_and_pins_the_commit(tmp_path, monkeypatch):
    calls = []
    commit = "a" * 40

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        target = tmp_path / "snapshots" / commit / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PH_FIXTURE / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    found = hub.resolve_model_dir(D118_PH, revision="v2", cache_dir="/some/cache", token="hf_secret")
    assert found == tmp_path / "snapshots" / commit
    options = dict(cache_dir="/some/cache", local_files_only=False, token="hf_secret")
    assert calls == [
        (D118_PH_REPO, "model.safetensors", dict(revision="v2", **options)),
        (D118_PH_REPO, "config.json", dict(revision=commit, **options)),  # the weights' commit, not "v2"
    ]


def test_download_errors_become_weights_not_found(monkeypatch, tmp_path):
    def refused(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refused)
    with pytest.raises(WeightsNotFoundError, match="connection refused") as error:
        hub.resolve_model_dir("someone/caduceus-ph_seqlen-2k_d_model-64_n_layer-2", cache_dir=tmp_path)
    assert isinstance(error.value.__cause__, huggingface_hub.errors.LocalEntryNotFoundError)


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves /<org>/<name>/resolve/<rev>/<file> from ``files``; ``truncate`` cuts the weights short."""

    files: dict[str, bytes] = {}
    truncate = False

    def _headers(self, body: bytes, length: int) -> None:
        self.send_response(200)
        self.send_header("X-Repo-Commit", "b" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def do_HEAD(self):
        body = self.files[self.path.rsplit("/", 1)[1]]
        self._headers(body, len(body))

    def do_GET(self):
        body = self.files[self.path.rsplit("/", 1)[1]]
        sent = body[: len(body) // 2] if self.truncate and self.path.endswith(".safetensors") else body
        self._headers(body, len(sent))
        self.wfile.write(sent)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.files = {name: (PH_FIXTURE / name).read_bytes() for name in MODEL_FILES}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    yield FakeHub
    server.shutdown()
    server.server_close()


def test_failed_download_leaves_nothing_half_written_and_a_retry_completes(tmp_path, fake_hub):
    fake_hub.truncate = True
    with pytest.raises(WeightsNotFoundError, match="Consistency check failed.*model.safetensors"):
        hub.resolve_model_dir(D118_PH, cache_dir=tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if "snapshots" in p.parts or "blobs" in p.parts], files
    assert not [p for p in files if p.name.endswith(".incomplete")]

    fake_hub.truncate = False
    snapshot = hub.resolve_model_dir(D118_PH, cache_dir=tmp_path)
    assert snapshot.name == "b" * 40
    for name in MODEL_FILES:
        assert (snapshot / name).read_bytes() == (PH_FIXTURE / name).read_bytes()
    assert same_weights(CaduceusForMaskedLM.from_pretrained(snapshot), CaduceusForMaskedLM.from_pretrained(PH_FIXTURE))

