"""Session management (book ch. 4.4): a conversation's turns kept by session id, with per-session limits on
turns and tokens and an idle expiry. In memory, bounded (the least recently used session goes first), one
lock: a service restart forgets every session, which the page's client copes with by starting a new one.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Session:
    messages: list[dict] = field(default_factory=list)   # user and assistant turns, oldest first
    turns: int = 0                                        # exchanges answered
    tokens: int = 0                                       # prompt + completion tokens spent
    last_used: float = 0.0


class SessionStore:
    def __init__(self, max_turns: int, max_tokens: int, ttl_s: float, max_sessions: int, clock=time.monotonic):
        self.max_turns, self.max_tokens, self.ttl_s, self.max_sessions = max_turns, max_tokens, ttl_s, max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._sessions:
            sid, s = next(iter(self._sessions.items()))
            if now - s.last_used <= self.ttl_s:
                break
            del self._sessions[sid]

    def get(self, session_id: str) -> Session:
        """The session (a fresh one when unknown or expired); it becomes the most recently used."""
        now = self.clock()
        with self._lock:
            self._expire(now)
            s = self._sessions.pop(session_id, None) or Session()
            s.last_used = now
            self._sessions[session_id] = s
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return s

    def over_limit(self, s: Session) -> str | None:
        if s.turns >= self.max_turns:
            return "session_turn_limit"
        if s.tokens >= self.max_tokens:
            return "session_token_limit"
        return None

    def record(self, session_id: str, new_messages: list[dict], reply: str, tokens: int) -> None:
        """Append this exchange (the client's new turns and the reply) and its token cost."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                s = self._sessions[session_id] = Session()
            s.messages += [*(m for m in new_messages if m["role"] != "system"), {"role": "assistant", "content": reply}]
            s.turns += 1
            s.tokens += tokens
            s.last_used = self.clock()

    def __len__(self) -> int:
        return len(self._sessions)
