"""Request bodies of the OpenAI dialect, with the ranges OpenAI documents.

Fields Atelier supports beyond OpenAI's (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`poem`) come through the SDK's `extra_body`. Limits that depend on settings (n, max_tokens, prompt

length) are checked in the route, where the settings are.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI fields we accept but do not implement: rejected when set to a non-default value,
# so that nobody believes they took effect.
UNSUPPORTED = {"logit_bias": None, "suffix": None, "best_of": 1, "tools": None, "functions": None,
               "tool_choice": None, "response_format": None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    store: bool = True  # each choice goes to the gallery (artifact kind "text") with its provenance
    # extra_body
    top_k: int = Field(default=0, ge=0, le=100_000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False
    poem: dict | None = None
    keep_alive: str | float | None = None  # how long the model stays loaded once idle ("5m", 0, -1)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # a data URL (data:image/png;base64,…); remote URLs are refused, never fetched
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    """OpenAI's image content part. A poet model writes a poem about the picture (image → poem)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[ContentPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, ContentPart))

    def images(self) -> list[tuple[int, str]]:
        """(index in content, url) of each image part."""
        if not isinstance(self.content, list):
            return []
        return [(j, p.image_url.url) for j, p in enumerate(self.content) if isinstance(p, ImagePart)]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=5)
