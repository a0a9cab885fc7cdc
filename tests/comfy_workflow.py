"""The workflow → API-prompt converter the server tests use: ``unlearn_core.workflow`` (one copy of the code, which
``batch --comfyui`` also runs)."""

from unlearn_core.workflow import WorkflowError, to_api_prompt, widget_names

__all__ = ["WorkflowError", "to_api_prompt", "widget_names"]
