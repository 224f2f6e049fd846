"""Every bad image request gets a 4xx in OpenAI's error shape naming the field (limits from the image_server fixture)."""

import openai
import pytest

GEN = {"model": "tiny-diffusion", "prompt": "grinning cat face", "size": "32x32", "seed": 1, "steps": 3}


def error_of(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("change, param, status, says", [
    ({"size": "33x33"}, "size", 400, "32x32, 64x64"),
    ({"size": "1024x1024"}, "size", 400, "sizes:"),
    ({"n": 5}, "n", 400, "ATELIER_MAX_IMAGE_N"),
    ({"n": 0}, "n", 400, ""),
    ({"steps": 51}, "steps", 400, "ATELIER_MAX_IMAGE_STEPS"),
    ({"steps": 0}, "steps", 400, ""),
    ({"guidance": -1}, "guidance", 400, ""),
    ({"guidance": 21}, "guidance", 400, ""),
    ({"prompt": ""}, "prompt", 400, "empty"),
    ({"prompt": "   "}, "prompt", 400, "empty"),
    ({"prompt": "cat " * 40}, "prompt", 400, "ATELIER_MAX_PROMPT_CHARS"),
    ({"negative_prompt": "x" * 151}, "negative_prompt", 400, "ATELIER_MAX_PROMPT_CHARS"),
    ({"model": "no-such-model"}, "model", 404, ""),
    ({"model": "tang-poet"}, "model", 400, "cannot generate images"),
    ({"response_format": "gif"}, "response_format", 400, ""),
    ({"response_format": "url", "store": False}, "response_format", 400, "store"),
    ({"quality": "hd"}, "quality", 400, "not supported"),
    ({"moderation": []}, "moderation", 400, "not supported"),  # a list (schemathesis found the 500)
    ({"background": {"a": 1}}, "background", 400, "not supported"),
    ({"style": "vivid"}, "style", 400, "not supported"),
    ({"output_format": "jpeg"}, "output_format", 400, "png"),
    ({"seed": -1}, "seed", 400, ""),
    ({"partial_images": 3, "stream": True}, "partial_images", 400, "steps"),
    ({"model": "tiny-gan", "steps": 10}, "steps", 400, "does not apply"),
    ({"model": "tiny-gan", "negative_prompt": "car"}, "negative_prompt", 400, "does not apply"),
])
def test_bad_generation_requests(image_http, change, param, status, says):
    body = {k: v for k, v in (GEN | change).items()}
    if body["model"] == "tiny-gan":
        body.pop("steps") if "steps" not in change else None
    err = error_of(image_http.post("/v1/images/generations", json=body), status)
    assert err["param"] == param and says in err["message"]


def test_missing_prompt_and_bad_json(image_http):
    assert error_of(image_http.post("/v1/images/generations", json={"model": "tiny-diffusion"}), 400)["param"] == "prompt"
    err = error_of(image_http.post("/v1/images/generations", content=b"{not json",
                                   headers={"content-type": "application/json"}), 400)
    assert err["code"] == "invalid_json"


def test_sdk_raises_bad_request_with_the_field(image_client):
    with pytest.raises(openai.BadRequestError) as e:
        image_client.images.generate(model="tiny-diffusion", prompt="cat", size="512x512")
    assert e.value.body["param"] == "size" and "32x32" in e.value.body["message"]


def test_gallery_bad_input(image_http):
    assert error_of(image_http.get("/api/artifacts", params={"kind": "sculpture"}), 400)["param"] == "kind"
    assert error_of(image_http.get("/api/artifacts", params={"limit": 0}), 400)["param"].endswith("limit")
    assert error_of(image_http.get("/api/artifacts/art_nope"), 404)["param"] == "artifact_id"
    assert error_of(image_http.get("/api/artifacts", params={"after": "art_nope"}), 404)["param"] == "artifact_id"
    assert error_of(image_http.get("/api/artifacts/art_nope/content", params={"expires": "soon", "sig": "x"}),
                    400)["param"].endswith("expires")
