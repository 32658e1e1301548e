"""VLMJudge against a small OpenAI-compatible chat server of the test's own, which answers like a VLM would: it
decodes the PNG data URL it is sent and rates the image's brightness, in the reply format a mode asks for."""

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from fastsearch.verifiers import DEFAULT_RUBRIC, VLMJudge, VLMReplyError, png_data_url  # noqa: E402


class _Judge(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: the score is 10 x the image's mean brightness; ``server.mode`` shapes the reply."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        content = body["messages"][0]["content"]
        text = next(part["text"] for part in content if part["type"] == "text")
        url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
        prefix = "data:image/png;base64,"
        assert url.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))
        brightness = float(np.asarray(image.convert("RGB"), dtype=np.float64).mean()) / 255
        score = round(10 * brightness, 4)
        with server.lock:
            server.requests.append({"model": body["model"], "text": text, "temperature": body.get("temperature")})
            tries = server.tries.setdefault(text + url, 0)
            server.tries[text + url] += 1
        reply = {"good": json.dumps({"score": score}),
                 "fenced": f"```json\n{json.dumps({'score': score})}\n```",
                 "prose_once": f"The image is nice. Score: {score}" if tries == 0 else json.dumps({"score": score}),
                 "always_prose": f"I would give it {score} out of 10.",
                 "out_of_range": json.dumps({"score": 11}),
                 "string": json.dumps({"score": str(score)}),
                 "no_key": json.dumps({"rating": score}),
                 "no_content": None}[server.mode]
        payload = json.dumps({"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": reply}}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def judge_server(server):
    server.mode, server.requests, server.tries = "good", [], {}
    return server


def _client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="test", max_retries=0)


def _images():
    levels = torch.tensor([0.12, 0.52, 0.81, 0.33])  # away from the 8-bit rounding midpoints
    return levels[:, None, None, None].expand(4, 3, 6, 5).clone()  # flat grey images of known brightness


def _expected(images):
    """What the server rates: the mean of the 8-bit pixels the PNG carries, times 10 (the server rounds to 1e-4)."""
    return ((images * 255).round() / 255).mean(dim=(1, 2, 3)) * 10


def test_png_data_url_round_trips_through_pil():
    image = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(0))
    url = png_data_url(image)
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.mode == "RGB" and decoded.size == (5, 7)
    pixels = torch.from_numpy(np.array(decoded)).permute(2, 0, 1).float()
    assert torch.equal(pixels, (image * 255).round())


def test_vlm_judge_scores_through_an_openai_client(judge_server):
    judge = VLMJudge(_client(judge_server), "tiny-vlm", max_workers=3)
    images = _images()
    prompts = ["a red fox", "a cat", "a car", "a dog"]
    scores = judge(images, prompts=prompts)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(scores, _expected(images), atol=1e-3, rtol=0)
    texts = sorted(request["text"] for request in judge_server.requests)
    assert texts == sorted(DEFAULT_RUBRIC.format(prompt=prompt, low="0", high="10") for prompt in prompts)
    assert {request["model"] for request in judge_server.requests} == {"tiny-vlm"}
    assert {request["temperature"] for request in judge_server.requests} == {0.0}
    assert (judge.cost.calls, judge.cost.images, judge.requests) == (1, 4, 4) and judge.cost.seconds > 0
    # [-1, 1] images, channels last, and one prompt for all
    signed = VLMJudge(_client(judge_server), "tiny-vlm", image_range=(-1, 1))
    torch.testing.assert_close(signed((images * 2 - 1).permute(0, 2, 3, 1), prompts="a fox"), scores,
                               atol=1e-3, rtol=0)


def test_vlm_judge_retries_malformed_replies_and_accepts_a_fenced_object(judge_server):
    judge = VLMJudge(_client(judge_server), "tiny-vlm", retries=1)
    images = _images()
    judge_server.mode = "prose_once"
    torch.testing.assert_close(judge(images, prompts="x"), _expected(images), atol=1e-3, rtol=0)
    assert judge.requests == 8, "every image was asked twice"
    judge_server.mode = "fenced"
    torch.testing.assert_close(judge(images, prompts="x"), _expected(images), atol=1e-3, rtol=0)
    assert judge.requests == 12


@pytest.mark.parametrize("mode, reason", [
    ("always_prose", r"not a JSON object.*reply: 'I would give it"),
    ("out_of_range", r"'score' is 11, outside \[0, 10\]"),
    ("string", r"'score' is '\d.*', not a finite number"),
    ("no_key", r"the JSON object has no 'score' key"),
    ("no_content", r"message content is NoneType, not text"),
])
def test_vlm_judge_gives_a_clear_error_when_replies_stay_malformed(judge_server, mode, reason):
    judge_server.mode = mode
    judge = VLMJudge(_client(judge_server), "tiny-vlm", retries=2, max_workers=1)
    with pytest.raises(VLMReplyError, match=r"reply for image 0 stayed malformed after 3 tries.*" + reason):
        judge(_images()[:1], prompts="x")
    assert judge.requests == 3 and len(judge_server.requests) == 3
    assert judge.cost.calls == 0, "a call that fails is not counted"


def test_vlm_judge_parses_strictly():
    class Client:  # the create(...) shape is all VLMJudge needs
        class chat:  # noqa: N801
            class completions:  # noqa: N801
                @staticmethod
                def create(**kwargs):
                    return {"choices": [{"message": {"content": '{"score": 7.5}'}}]}

    judge = VLMJudge(Client(), "m", score_range=(1, 10))
    assert judge(torch.rand(2, 3, 4, 4), prompts=["a", "b"]).tolist() == [7.5, 7.5]
    assert judge.parse(' {"score": 3} ') == 3.0 and judge.parse('```\n{"score": 1, "why": "dark"}\n```') == 1.0
    for reply in ('Score: {"score": 3}', '{"score": 3} thanks', '[3]', '{"score": true}', '{"score": NaN}',
                  '{"score": 0.5}', '```json\n{"score": 3}\n``` and more', ""):
        with pytest.raises(ValueError):
            judge.parse(reply)


def test_vlm_judge_bad_arguments(judge_server):
    client = _client(judge_server)
    with pytest.raises(TypeError, match=r"client must have client.chat.completions.create"):
        VLMJudge(object(), "m")
    with pytest.raises(TypeError, match="model must be the served model's name"):
        VLMJudge(client, "")
    with pytest.raises(ValueError, match="rubric must be a str.format template"):
        VLMJudge(client, "m", "Reply {score: 3} for {prompt}")
    with pytest.raises(ValueError, match="score_range must have low < high"):
        VLMJudge(client, "m", score_range=(10, 0))
    with pytest.raises(ValueError, match="retries must be at least 0"):
        VLMJudge(client, "m", retries=-1)
    judge = VLMJudge(client, "m")
    with pytest.raises(ValueError, match=r"prompts is required: the rubric uses \{prompt\}"):
        judge(_images())
    with pytest.raises(ValueError, match="prompts has 2 entries but there are 4 images"):
        judge(_images(), prompts=["a", "b"])
    with pytest.raises(ValueError, match="images has values in"):
        judge(_images() * 2 - 1, prompts="a")
    assert judge_server.requests == [], "bad input is refused before any request"
    no_prompt = VLMJudge(client, "m", "Rate this image from {low} to {high} as JSON {{\"score\": n}}.")
    assert no_prompt(_images()[:1]).shape == (1,)
