"""The serving engine: requests, scheduler, paged KV cache, model runner, and the sync and async engines."""

from tiermoe.engine.async_engine import AsyncLLMEngine
from tiermoe.engine.llm_engine import LLMEngine
from tiermoe.engine.request import Request, RequestStatus

__all__ = ["AsyncLLMEngine", "LLMEngine", "Request", "RequestStatus"]
