"""The one way litellm is imported: lazily, quietly and offline.

Importing litellm costs seconds and ~200 MB, so only providers that need its
translation (and prompts that need its token counter) pay for it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Final

# litellm fetches these from GitHub at import or first use unless told to stay local.
_LOCAL_ONLY_FLAGS: Final = (
    "LITELLM_LOCAL_MODEL_COST_MAP",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS",
    "LITELLM_LOCAL_BLOG_POSTS",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS",
    "LITELLM_LOCAL_POLICY_TEMPLATES",
)


@functools.cache
def load_litellm() -> Any:
    """Import litellm (the first call takes seconds), telemetry and chatter off."""
    for flag in _LOCAL_ONLY_FLAGS:
        os.environ.setdefault(flag, "True")
    litellm: Any = importlib.import_module("litellm")
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return litellm
