"""Fake LLM provider servers with fault injection, for end-to-end tests, demos and drills.

Each fake is a real HTTP server on 127.0.0.1 speaking one provider's wire protocol::

    with FakeOpenAI("cloud") as fake:
        fake.set_fault("status", status=503, times=1)
        ...  # point a client at fake.url + "/v1"

See :class:`Fault` for the fault kinds. ``fake.stop()`` closes the port (connection refused);
:class:`Blackhole` is a port whose connects hang (firewall dropping SYNs).
"""

from ._anthropic import FakeAnthropic
from ._blackhole import Blackhole
from ._core import ReceivedRequest, count_words, fake_vector, prompt_words
from ._fault import FAULT_KINDS, Fault
from ._gemini import FakeGemini
from ._ollama import FakeOllama
from ._openai import FakeOpenAI
from ._server import FakeServer

__all__ = [
    "FAULT_KINDS",
    "Blackhole",
    "FakeAnthropic",
    "FakeGemini",
    "FakeOllama",
    "FakeOpenAI",
    "FakeServer",
    "Fault",
    "ReceivedRequest",
    "count_words",
    "fake_vector",
    "prompt_words",
]
