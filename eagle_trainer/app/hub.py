"""Hugging Face Hub ids wherever a command takes a target, a draft or chat data: resolved to local paths here.

    resolve(value, kind=..., what=...)   an existing local path as it is; else a Hub id `org/name[@revision][/path]`
                                         -> its snapshot in the Hugging Face cache (fetched there first unless
                                         offline), or the file or folder `path` inside it
    resolve_options(args, kinds)         a command's --target / --data / --draft ... resolved in place
    resolve_recipe(cfg)                  the recipe's target.path, data.path, data.eval_path and draft.init_from
                                         resolved; -> (the recipe with local paths, the Hub ids by key)

What is fetched depends on the kind (KINDS): a target's config, tokenizer and top-level safetensors files (no
*.bin, no subfolders such as original/), a draft's json and safetensors files, a data set's one chat JSONL file:
the file `path` names, else the only *.jsonl of the repo (or of the folder `path` names). The revision is a
branch, a tag or a commit sha (a branch with a `/` in its name: only refs/pr/N). huggingface_hub honours HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE; with HF_HUB_OFFLINE=1 nothing is fetched and the cache alone answers. Under
torchrun every rank resolves the same id (downloads into a shared cache are locked by huggingface_hub).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from eagle_trainer.config import Config


@dataclass(frozen=True)
class Kind:
    """What a value names (a target, a tokenizer, a draft, chat data) and what of a Hub repo it needs."""

    repo_type: str  # model | dataset
    thing: str  # what a local value of this kind names: directory | file
    files: tuple[str, ...]  # allow_patterns, relative to the repo folder the id names
    top_level: bool = False  # none of a subfolder's files (original/, ...): the target loader reads the top level


KINDS = {
    "target": Kind("model", "directory", ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja",
                                          "*.py"), top_level=True),
    "tokenizer": Kind("model", "directory", ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"),
                      top_level=True),
    "draft": Kind("model", "directory", ("*.json", "*.safetensors")),  # a checkpoint, a run dir or an export
    "data": Kind("dataset", "file", ("*.jsonl",)),
}

# org/name, then @revision (refs/pr/N may hold slashes; other revisions none), then a path inside the repo
_HUB_ID = re.compile(r"(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>refs/pr/\d+|[^/]+))?(?:/(?P<path>.+))?")


@dataclass(frozen=True)
class HubId:
    repo: str  # org/name
    revision: str | None  # None: the default branch (main)
    path: str  # a file or folder inside the repo; "" for its root

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f"/{self.path}" if self.path else "")

    def download_command(self, kind: Kind) -> str:
        options = (f" --repo-type {kind.repo_type}" if kind.repo_type != "model" else "") + (
            f" --revision {self.revision}" if self.revision else "")
        return f"hf download {self.repo}{options}"


def parse_hub_id(value: str) -> HubId | None:
    """`org/name[@revision][/path]` as a HubId, or None where `value` cannot be one (an absolute path, ./x, x)."""
    match = _HUB_ID.fullmatch(value)
    if match is None or ".." in (match["path"] or "").split("/"):
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return HubId(match["repo"], match["revision"], (match["path"] or "").strip("/"))


def hub_cache() -> str:
    """The cache huggingface_hub would use were it imported now: it reads HF_HUB_CACHE and HF_HOME only once, at
    import (huggingface_hub.constants), and a command may have set them later (a plugin, a test)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub read it at import."""
    now = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
              for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or constants.HF_HUB_OFFLINE


def resolve(value: str, *, kind: str, what: str) -> str:
    """The local path `value` names: itself where it exists, else the Hub id's files in the Hugging Face cache.
    `kind`: a key of KINDS; `what`: the key or option `value` came from, for the errors (`target.path`, `--data`)."""
    if Path(value).expanduser().exists():
        return value
    spec = KINDS[kind]
    hub = parse_hub_id(value)
    if hub is None:
        raise ValueError(f"{what}={value!r} does not exist as a local {spec.thing} and is not a Hub id "
                         f"(org/name[@revision]); set it to a local {spec.thing} or a Hugging Face repo id")
    snapshot = Path(fetch(hub, spec, what, value))
    if spec.repo_type == "dataset":
        return str(_chat_file(snapshot, hub, what, value))
    if not (snapshot / hub.path).is_dir():
        raise ValueError(f"{what}={value!r}: the Hub repo {hub.repo} has no folder {hub.path!r}; name a folder of it "
                         "(or none, for the whole repo)")
    return str(snapshot / hub.path)


def fetch(hub: HubId, spec: Kind, what: str, value: str) -> str:
    """snapshot_download of the files `spec` needs (from the cache alone when offline) -> the snapshot folder."""
    prefix = f"{hub.path}/" if hub.path else ""
    files = [prefix + pattern for pattern in spec.files]
    if spec.repo_type == "dataset" and hub.path:  # the file the path names, or the JSONL files in that folder
        files.append(hub.path)
    offline, cache = hub_offline(), hub_cache()
    try:
        return snapshot_download(hub.repo, repo_type=spec.repo_type, revision=hub.revision, cache_dir=cache,
                                 allow_patterns=files, ignore_patterns=[f"{prefix}*/*"] if spec.top_level else None,
                                 local_files_only=offline)
    except RevisionNotFoundError:
        raise ValueError(f"{what}={value!r}: the Hub repo {hub.repo} has no revision {hub.revision!r}; name one of "
                         "its branches, tags or commits after the @") from None
    except RepositoryNotFoundError:  # GatedRepoError too
        raise ValueError(f"{what}={value!r}: no such local {spec.thing}, and the Hub has no {spec.repo_type} repo "
                         f"{hub.repo} that this login may read (a private or gated one needs `hf auth login`); set "
                         f"{what} to a local {spec.thing} or an existing repo id") from None
    except LocalEntryNotFoundError:  # not cached, and offline or the Hub unreachable (connection errors end here)
        why = "offline: HF_HUB_OFFLINE=1" if offline else "no connection"
        raise ValueError(f"{what}={value!r} is neither a local {spec.thing} nor in the Hugging Face cache "
                         f"(HF_HUB_CACHE={cache}), and the Hub cannot be reached ({why}): download it where the Hub "
                         f"is reachable with `{hub.download_command(spec)}` or set {what} to a local "
                         f"{spec.thing}") from None
    except HfHubHTTPError as e:  # the Hub answered, with an error (a server error, a refused token)
        raise ValueError(f"{what}={value!r}: the Hub refused {hub.repo} ({str(e).splitlines()[0]}); retry, or "
                         f"download it with `{hub.download_command(spec)}` first") from None


def _chat_file(snapshot: Path, hub: HubId, what: str, value: str) -> Path:
    """The chat JSONL file a data set's Hub id names: the file its path names, or the only *.jsonl under it."""
    named = snapshot / hub.path
    if named.is_file():
        return named
    candidates = sorted(named.rglob("*.jsonl")) if named.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    pick = f"{what}={hub.repo}{'@' + hub.revision if hub.revision else ''}/<file>"
    if not candidates:
        raise ValueError(f"{what}={value!r}: the Hub data set {hub.repo} has no *.jsonl file"
                         f"{' at ' + repr(hub.path) if hub.path else ''}; name its chat JSONL file as {pick}")
    names = ", ".join(str(c.relative_to(snapshot)) for c in candidates)
    raise ValueError(f"{what}={value!r}: the Hub data set {hub.repo} has {len(candidates)} chat JSONL files "
                     f"({names}); pick one as {pick}")


def resolve_options(args: argparse.Namespace, kinds: dict[str, str]) -> None:
    """The command-line options `kinds` names (argparse dest -> kind of KINDS) resolved in `args`, where set."""
    for dest, kind in kinds.items():
        value = getattr(args, dest, None)
        if value is not None:
            setattr(args, dest, resolve(value, kind=kind, what="--" + dest.replace("_", "-")))


# the recipe keys that take a Hub id, and the kind of each
RECIPE_KEYS = {"target.path": "target", "data.path": "data", "data.eval_path": "data", "draft.init_from": "draft"}


def recipe_paths(cfg: Config) -> dict[str, str | None]:
    """The values of RECIPE_KEYS in `cfg`."""
    return {"target.path": cfg.target.path, "data.path": cfg.data.path, "data.eval_path": cfg.data.eval_path,
            "draft.init_from": cfg.draft.init_from}


def resolve_recipe(cfg: Config) -> tuple[Config, dict[str, HubId]]:
    """The recipe with RECIPE_KEYS as local paths -> (that recipe, the Hub id of each key that named one). Offline
    training (data.offline_path) reads no chat data: data.path and data.eval_path are left as they are."""
    given = recipe_paths(cfg)
    read = {key: value for key, value in given.items()
            if value is not None and not (cfg.data.offline_path is not None and key.startswith("data."))}
    local = {**given, **{key: resolve(value, kind=RECIPE_KEYS[key], what=key) for key, value in read.items()}}
    ids = {key: parse_hub_id(value) for key, value in given.items() if local[key] != value}
    resolved = replace(cfg, target=replace(cfg.target, path=local["target.path"]),
                       data=replace(cfg.data, path=local["data.path"], eval_path=local["data.eval_path"]),
                       draft=replace(cfg.draft, init_from=local["draft.init_from"]))
    return resolved, ids
