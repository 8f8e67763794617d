"""Which model the service runs, and the hot swap when the registry alias moves.

`ModelHolder` keeps the current Assistant. Its source is either a model folder (tests, a quick local run) or a
registry URI, by default `models:/forgeline-llm@champion`: a background thread resolves the alias every
`reload_poll_s`; when it names another version the holder downloads and loads that version beside the old one,
then swaps the reference. A request takes `holder.current()` once and keeps that Assistant to the end, so the
requests in flight finish on the model they started with; the old one goes when the last of them lets go.

The reward model (`reward_dir`) and the guard are loaded once and shared by every version; a reward model whose
tokenizer differs from the version's is not used (best-of-N then keeps the first candidates, and says so).
"""
from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

from serve.llm.assistant import Assistant, ServiceConfig

log = logging.getLogger("forgeline.serve.llm")


class ModelUnavailable(RuntimeError):
    """No model to serve (yet): the alias does not exist, or its files cannot be loaded."""


class ModelHolder:
    def __init__(self, target: str, reward_dir: str | None = None, guard=None, cfg: ServiceConfig | None = None):
        self.target, self.reward_dir, self.guard = target, reward_dir, guard
        self.cfg = cfg or ServiceConfig()
        self.is_registry = target.startswith("models:/")
        self._assistant: Assistant | None = None
        self._version: str | None = None
        self._lock = threading.Lock()           # one load at a time
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._reward = None
        self.swaps = 0

    # ---------------------------------------------------------------- loading

    def _reward_for(self, model_dir: Path):
        if not self.reward_dir:
            return None
        same_tok = (Path(self.reward_dir) / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
        if not same_tok:
            log.warning("reward model %s has another tokenizer than %s: best-of-N without it", self.reward_dir, model_dir)
            return None
        if self._reward is None:
            from forgeline.checkpoint import load_model_folder
            from models.reward_model import RewardModel

            self._reward = load_model_folder(self.reward_dir, RewardModel)
        return self._reward

    def _load(self, model_dir: Path, name: str) -> Assistant:
        from forgeline.chat import load_tokenizer
        from forgeline.checkpoint import load_model_folder

        model = load_model_folder(model_dir)
        tok = load_tokenizer(model_dir / "tokenizer.json")
        return Assistant(model, tok, self._reward_for(model_dir), self.guard, self.cfg, name=name)

    def resolve(self) -> str:
        """The version the source names now: 'forgeline-llm/<v>' for a registry alias, the folder otherwise."""
        if not self.is_registry:
            return str(self.target)
        from forgeline.registry import resolve

        try:
            mv = resolve(self.target)
        except Exception as e:   # MlflowException (no such alias/model), a store that cannot be read
            raise ModelUnavailable(f"{self.target}: {e}") from e
        return f"{mv.name}/{mv.version}"

    def _fetch_and_load(self, version: str) -> Assistant:
        if not self.is_registry:
            return self._load(Path(self.target), version)
        from forgeline.registry import download

        with tempfile.TemporaryDirectory(prefix="forgeline-serve-") as tmp:
            root = download(f"models:/{version}", tmp)
            configs = sorted(Path(root).rglob("config.json"))
            if not configs:
                raise ModelUnavailable(f"models:/{version} holds no config.json")
            return self._load(configs[0].parent, version)   # everything is in memory once loaded

    def poll(self) -> bool:
        """Load the version the source names now if it is not the one served; True when it swapped."""
        with self._lock:
            version = self.resolve()
            if version == self._version:
                return False
            fresh = self._fetch_and_load(version)
            old, self._assistant, self._version = self._version, fresh, version
            self.swaps += old is not None
            log.info("serving %s (was %s)", version, old)
            return True

    def current(self) -> Assistant:
        """The Assistant to answer one request with (loads the first one; starts the alias poller)."""
        a = self._assistant
        if a is not None:
            return a
        try:
            self.poll()
        except ModelUnavailable:
            raise
        except Exception as e:
            raise ModelUnavailable(f"{self.target}: cannot load: {e}") from e
        if self.is_registry and self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="forgeline-llm-alias", daemon=True)
            self._poller.start()
        return self._assistant

    @property
    def version(self) -> str | None:
        return self._version

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.cfg.reload_poll_s):
            try:
                self.poll()
            except Exception as e:   # keep serving the loaded version; say why the new one is not served
                log.warning("alias poll: %s", e)

    def close(self) -> None:
        self._stop.set()
