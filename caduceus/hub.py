"""Where weights come from: a local directory, the package's bundled weights, or the Hugging Face Hub.

``resolve_model_dir`` turns a model name into a directory holding ``config.json`` and
``model.safetensors``, trying in order:

1. a local directory (a path that exists);
2. a model bundled with the package (``BUNDLED_MODELS``, files in ``caduceus/weights/<name>/``);
3. the Hugging Face Hub, for the six published names (``PUBLISHED_MODELS``) or any repo id, through
   ``huggingface_hub`` so that its cache, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens
   work as everywhere else. Only the two files are fetched. ``huggingface_hub`` writes each file to a
   temporary name and renames it when complete, so a failed download leaves no partial file behind.

If none works, ``WeightsNotFoundError`` names the missing files and says how to place them by hand.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import EntryNotFoundError, HFValidationError

from caduceus.configuration import CaduceusModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME)
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelInfo:
    """What a model name stands for. ``input_size`` is the longest input (in bases) the model was trained
    on, ``None`` when unknown; ``repo_id`` is ``None`` for bundled weights and local directories."""

    input_size: int | None
    embedding_size: int
    n_layer: int
    repo_id: str | None = None


PUBLISHED_MODELS: dict[str, ModelInfo] = {
    "caduceus-ph-4L-seqlen-1k-d118": ModelInfo(
        1024, 118, 4, "kuleshov-group/caduceus-ph_seqlen-1k_d_model-118_n_layer-4_lr-8e-3"),
    "caduceus-ph-4L-seqlen-1k-d256": ModelInfo(
        1024, 256, 4, "kuleshov-group/caduceus-ph_seqlen-1k_d_model-256_n_layer-4_lr-8e-3"),
    "caduceus-ph-16L-seqlen-131k-d256": ModelInfo(
        131072, 256, 16, "kuleshov-group/caduceus-ph_seqlen-131k_d_model-256_n_layer-16"),
    "caduceus-ps-4L-seqlen-1k-d118": ModelInfo(
        1024, 118, 4, "kuleshov-group/caduceus-ps_seqlen-1k_d_model-118_n_layer-4_lr-8e-3"),
    "caduceus-ps-4L-seqlen-1k-d256": ModelInfo(
        1024, 256, 4, "kuleshov-group/caduceus-ps_seqlen-1k_d_model-256_n_layer-4_lr-8e-3"),
    "caduceus-ps-16L-seqlen-131k-d256": ModelInfo(
        131072, 256, 16, "kuleshov-group/caduceus-ps_seqlen-131k_d_model-256_n_layer-16"),
}

# Models shipped inside the package: name -> ModelInfo (repo_id None), files in WEIGHTS_DIR / name.
# Adding one is an entry here and a folder with config.json + model.safetensors.
# Pretrained by this project on GRCh37 chr20 + chrX 0-60 Mb (not the published weights; see each README.md).
BUNDLED_MODELS: dict[str, ModelInfo] = {
    "caduceus-dna-ph-4L-1k-d118-grch37": ModelInfo(1024, 118, 4),
    "caduceus-dna-ps-4L-1k-d118-grch37": ModelInfo(1024, 118, 4),
}

# The naming of the published repos, e.g. caduceus-ps_seqlen-131k_d_model-256_n_layer-16[_lr-8e-3].
_REPO_NAME = re.compile(r"caduceus-(?:ph|ps)_seqlen-(\d+)k_d_model-(\d+)_n_layer-(\d+)(?:_[\w.-]+)?")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class WeightsNotFoundError(FileNotFoundError):
    """The weights of a model could not be found locally nor downloaded."""


def available_models() -> list[str]:
    """Every model name that needs no path or repo id: bundled first, then the published ones."""
    return [*BUNDLED_MODELS, *PUBLISHED_MODELS]


def _seqlen_from_name(kilobases: str) -> int:
    """``1k`` -> 1024, ``131k`` -> 131072: the published lengths are powers of two written in thousands."""
    return 2 ** round(math.log2(int(kilobases) * 1000))


def model_info(name_or_path: str | os.PathLike) -> ModelInfo | None:
    """Sizes of a model from its name alone (no download), or ``None`` if the name means nothing.

    Registry names come from the tables above; repo ids and directories named like the published
    repos are parsed; other local directories are read (``config.json``) with an unknown input size.
    """
    path = Path(name_or_path).expanduser()
    parsed = _REPO_NAME.fullmatch(path.name)
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise WeightsNotFoundError(_missing_files_message(f"directory {path}", [config_path]))
        config = CaduceusModelConfig.from_json_file(config_path)
        input_size = _seqlen_from_name(parsed.group(1)) if parsed else None
        return ModelInfo(input_size, config.d_model, config.n_layer)
    name = str(name_or_path)
    if isinstance(name_or_path, os.PathLike):
        return None
    if name in BUNDLED_MODELS or name in PUBLISHED_MODELS:
        return BUNDLED_MODELS.get(name) or PUBLISHED_MODELS[name]
    if parsed and _REPO_ID.fullmatch(name):
        return ModelInfo(_seqlen_from_name(parsed.group(1)), int(parsed.group(2)), int(parsed.group(3)), name)
    return None


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> Path:
    """The directory holding ``config.json`` and ``model.safetensors`` for a name, path or repo id.

    ``revision``, ``cache_dir``, ``local_files_only`` and ``token`` are passed to ``huggingface_hub``
    (``None``: its defaults and environment variables, e.g. ``HF_HUB_OFFLINE=1``, ``HF_TOKEN``).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _check_complete(path, f"directory {path}")
    name = str(name_or_path)
    if isinstance(name_or_path, os.PathLike) or not (name in BUNDLED_MODELS or name in PUBLISHED_MODELS
                                                     or _REPO_ID.fullmatch(name)):
        raise WeightsNotFoundError(
            f"{name!r} is neither an existing directory, nor a known model name ({', '.join(available_models())}), "
            "nor a Hugging Face repo id ('org/name')"
        )
    if name in BUNDLED_MODELS:
        return _check_complete(WEIGHTS_DIR / name, f"bundled model {name!r}")
    repo_id = PUBLISHED_MODELS[name].repo_id if name in PUBLISHED_MODELS else name
    return _download(repo_id, revision, cache_dir, local_files_only, token)


def _check_complete(directory: Path, what: str) -> Path:
    missing = [directory / f for f in MODEL_FILES if not (directory / f).is_file()]
    if missing:
        raise WeightsNotFoundError(_missing_files_message(what, missing))
    return directory


def _missing_files_message(what: str, missing: list[Path]) -> str:
    return (f"{what}: missing {', '.join(str(p) for p in missing)}. A model directory needs "
            f"{' and '.join(MODEL_FILES)} (the published Hugging Face layout).")


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool | None,
    token: str | bool | None,
) -> Path:
    """Fetch the two files into the Hugging Face cache (or find them there) and return their snapshot.

    The weights come first; the config is then taken from the same commit, so that the two files
    always belong together even if the repo changes in between.
    """
    kwargs = dict(cache_dir=cache_dir, local_files_only=bool(local_files_only), token=token)
    try:
        weights = Path(huggingface_hub.hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision, **kwargs))
        commit = weights.parent.name
        huggingface_hub.hf_hub_download(repo_id, CONFIG_NAME, revision=commit, **kwargs)
    except (OSError, EntryNotFoundError, HFValidationError) as error:
        raise WeightsNotFoundError(_download_failed_message(repo_id, revision, cache_dir, error)) from error
    return weights.parent


def _download_failed_message(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, error: BaseException
) -> str:
    revision = revision or "main"
    cache = Path(cache_dir or hf_constants.HF_HUB_CACHE)
    missing = [f for f in MODEL_FILES
               if not isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f, cache, revision), str)]
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    offline = " (offline mode: HF_HUB_OFFLINE is set)" if hf_constants.HF_HUB_OFFLINE else ""
    return (
        f"Could not get {', '.join(missing) or ', '.join(MODEL_FILES)} of the Hugging Face repo {repo_id} "
        f"(revision {revision}){offline}: {type(error).__name__}: {reason}\n"
        f"To place the files by hand, download {' and '.join(MODEL_FILES)} from "
        f"https://huggingface.co/{repo_id}/tree/{revision} (or run "
        f"`hf download {repo_id} {' '.join(MODEL_FILES)}` where there is network access), then either\n"
        f"  - put both in one directory and pass that directory's path as the model name, or\n"
        f"  - add them to this machine's Hugging Face cache ({cache}) with\n"
        f"    python -c \"from caduceus.hub import place_in_cache; place_in_cache('DIRECTORY', '{repo_id}')\""
    )


def place_in_cache(
    directory: str | os.PathLike,
    repo_id: str,
    cache_dir: str | os.PathLike | None = None,
    revision: str = "main",
) -> Path:
    """Copy ``config.json`` and ``model.safetensors`` from ``directory`` into the Hugging Face cache as
    ``repo_id`` at ``revision``, for machines that cannot download. Returns the snapshot directory.

    The cache layout is the one ``huggingface_hub`` reads (``models--org--name/snapshots/<commit>/``
    and ``refs/<revision>``); the commit is a digest of the two files, as the real one is unknown.
    """
    source = _check_complete(Path(directory).expanduser(), f"directory {directory}")
    digest = hashlib.sha1()
    for name in MODEL_FILES:
        digest.update((source / name).read_bytes())
    commit = digest.hexdigest()
    repo_dir = Path(cache_dir or hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        temporary = snapshot / f".{name}.incomplete"
        shutil.copyfile(source / name, temporary)
        os.replace(temporary, snapshot / name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot
