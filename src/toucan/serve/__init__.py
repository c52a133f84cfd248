"""Serving on toucan.engine: terminal chat (chat.py), Gradio page (web.py), OpenAI-compatible API (api.py)."""
