"""The LLM pipeline's online side: an OpenAI-compatible API (api.py) over the book's inference pipeline
(assistant.py: input filter -> prompt enhancer -> response generator -> best-of-N -> response evaluator ->
rejection reply -> session). Importing this package loads nothing heavy; the router lives in serve/llm/api.py.
"""
