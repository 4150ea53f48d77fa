"""vlm_judge: the question, the P(Yes) math, and both backends on a tiny random Qwen2.5-VL.

The tiny judge (2 text layers of width 32, a 2-block vision tower, a 300-token byte-level BPE trained in
memory) is saved to a temporary folder and loaded through the reward's real local-path code. The server
backend talks real HTTP to ``refiner_rl.vlm.server`` serving that same model on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from refiner_rl.errors import CheckpointError
from refiner_rl.rewards.vlm_judge import VLMJudge
from refiner_rl.scoring.registry import (
    RewardConfigError,
    available_rewards,
    build_reward,
    check_required_fields,
)
from refiner_rl.vlm import (
    DIMENSIONS,
    TASKS,
    LocalVLM,
    build_query,
    p_yes_from_logits,
    p_yes_from_top_logprobs,
)
from refiner_rl.vlm.client import forget_servers
from refiner_rl.vlm.server import JudgeServer, Unavailable
from refiner_rl.vlm.tiny import PIXELS, build_tiny_vlm


def _yes_no_heavy(model, tokenizer) -> None:
    """With the 0.02 init every answer is ~uniform (P(Yes) = 2/300 whatever the image). Give Yes and No most of
    the mass, close to each other, so both P(Yes) readings sit mid-range (~0.2 softmax, ~0.44 yes/no) and move
    with the image."""
    yes_no = tokenizer.convert_tokens_to_ids(["Yes", "ĠYes", "No", "ĠNo"])
    with torch.no_grad():
        w = model.lm_head.weight
        w.normal_(0, 0.2)
        w[yes_no[:2]] *= 3.0
        w[yes_no[2:]] = w[yes_no[:2]] + 0.3 * torch.randn(2, w.shape[1])


def _build_tiny_judge(folder) -> None:
    """A random Qwen2.5-VL with a byte-level BPE tokenizer (Qwen's kind), saved like a hub checkpoint."""
    from transformers import AutoTokenizer

    # Yes/No dominate the corpus so that "Yes", " Yes", "No" and " No" become single tokens, as in Qwen's vocab.
    corpus = ["Yes No Yes. No."] * 200 + [" ".join(TASKS.values()) + " " + " ".join(DIMENSIONS.values())] * 5
    build_tiny_vlm(folder, corpus, vocab_size=300, max_positions=512, seed=1234, prepare=_yes_no_heavy)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in ["Yes", " Yes", "No", " No"])


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_qwen25vl")
    _build_tiny_judge(folder)
    return str(folder)


def local_judge(judge_dir, **options) -> VLMJudge:
    return VLMJudge(backend="local", model_name_or_path=judge_dir, min_pixels=PIXELS, max_pixels=PIXELS, **options)


@pytest.fixture(scope="module")
def vlm(judge_dir) -> LocalVLM:
    # The very object the local judges use (LocalVLM.shared), served by the loopback server.
    return local_judge(judge_dir, mode="pointwise").vlm


class FaultyServer(JudgeServer):
    """The judge server with latency (``delay`` seconds before each completion) and failures (the first
    ``fail_first`` completions answered 503) injected, so the client's timeouts and retries run for real."""

    def __init__(self, vlm, *, delay: float = 0.0, fail_first: int = 0, **kwargs):
        super().__init__(vlm, **kwargs)
        self.delay, self.fail_first, self.completions = delay, fail_first, 0

    def complete(self, body: dict) -> dict:
        with self._count_lock:
            self.completions += 1
            number = self.completions
        if number <= self.fail_first:
            raise Unavailable("injected failure")
        if self.delay and self._stop.wait(self.delay):
            raise Unavailable("shutting down")
        return super().complete(body)


@pytest.fixture
def serve(vlm):
    """Start loopback servers over the tiny judge; all are shut down after the test."""
    servers = []

    def start(**kwargs) -> JudgeServer:
        server = FaultyServer(vlm, served_model_name="tiny-judge", **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def server_judge(url, **options) -> VLMJudge:
    options = {"timeout": 10.0, "max_retries": 0, "backoff": 0.01, "top_logprobs": 300, **options}
    return VLMJudge(backend="server", base_url=url, **options)


def images(n, seed=0, size=(3, 24, 32)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=g) for _ in range(n)]


@pytest.fixture(autouse=True)
def _fresh_server_state():
    """Servers' down state and model are remembered per URL for the process; a test starts with none."""
    forget_servers()
    yield
    forget_servers()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the question ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dimension", sorted(DIMENSIONS))
@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_query_names_task_and_dimension_and_prompt_only_for_text_alignment(mode, dimension):
    q = build_query(mode=mode, task="refine", dimension=dimension, prompt="Fix the logo on the cup")
    assert DIMENSIONS[dimension] in q and TASKS["refine"] in q
    assert q.endswith("Answer Yes or No.")
    assert ("Is Image A better than Image B?" in q) == (mode == "pairwise")
    assert ("Fix the logo on the cup" in q) == (dimension == "text_alignment")


def test_query_include_prompt_always_never():
    kw = {"mode": "pointwise", "task": "fill", "prompt": "a red cup"}
    assert '"a red cup"' in build_query(dimension="aesthetics", include_prompt="always", **kw)
    assert "a red cup" not in build_query(dimension="text_alignment", include_prompt="never", **kw)
    assert "a red cup" not in build_query(
        dimension="text_alignment", include_prompt="always", mode="pointwise", task="fill", prompt=""
    )


def test_query_template_override_and_bad_placeholder():
    template = "{task}|{dimension}|{prompt}|{prompt_clause}"
    assert (
        build_query(template=template, task="removal", dimension="removal_quality", prompt="x")
        == "removal|removal quality||"
    )
    assert build_query(template=template, task="fill", dimension="text_alignment", prompt="a cat") == (
        'fill|text alignment|a cat| The text prompt is: "a cat".'
    )
    # Braces inside a prompt are data, not placeholders.
    assert build_query(template="{prompt}", dimension="text_alignment", prompt="{not a field}") == "{not a field}"
    with pytest.raises(ValueError, match=r"unknown placeholder \{image\}; known: task, dimension, prompt"):
        VLMJudge(backend="server", base_url="http://127.0.0.1:1", template="Is {image} good?")


def test_bad_options_name_what_works():
    with pytest.raises(ValueError, match="unknown `dimension: sharpness`; known: structure, consistency"):
        VLMJudge(backend="server", base_url="http://x", dimension="sharpness")
    with pytest.raises(ValueError, match="`compare_to: target` is not supported; use one of: draft, reference"):
        VLMJudge(backend="server", base_url="http://x", compare_to="target")
    with pytest.raises(ValueError, match="needs `model_name_or_path`"):
        VLMJudge(backend="local")
    with pytest.raises(ValueError, match="`both_orders: true` swaps images A and B, so it needs `mode: pairwise`"):
        VLMJudge(backend="server", base_url="http://x", mode="pointwise", both_orders=True)
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        VLMJudge(backend="server", base_url="localhost:8000")
    with pytest.raises(
        CheckpointError, match="cannot load a VLM processor from model_name_or_path='/nonexistent/judge'"
    ):
        VLMJudge(backend="local", model_name_or_path="/nonexistent/judge")
    # A custom dimension is fine once it is described.
    j = VLMJudge(
        backend="server",
        base_url="http://x",
        mode="pointwise",
        dimension="sharpness",
        dimension_description="sharpness: crisp edges",
    )
    assert "sharpness: crisp edges" in j.query("sharpness")


def test_required_fields_follow_mode_and_registry_reads_them():
    assert "vlm_judge" in available_rewards()
    pointwise = build_reward({"name": "vlm_judge", "mode": "pointwise", "backend": "server", "base_url": "http://x"})
    vs_ref = build_reward({"name": "vlm_judge", "compare_to": "reference", "backend": "server", "base_url": "http://x"})
    assert pointwise.required_fields == () and vs_ref.required_fields == ("reference",)
    check_required_fields([pointwise], ["draft"])
    with pytest.raises(RewardConfigError, match="reward 'vlm_judge' needs reference"):
        check_required_fields([vs_ref], ["draft", "target"])


# -- P(Yes) ----------------------------------------------------------------------------------------


def test_p_yes_from_logits_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    # softmax: e^2 / (e^2 + 1 + e + e^-1) = 7.389056 / 11.475217
    assert p_yes_from_logits(logits, [0], [2], "softmax").item() == pytest.approx(0.6439143, abs=1e-6)
    # yes_no: e^2 / (e^2 + e) = 1 / (1 + e^-1)
    assert p_yes_from_logits(logits, [0], [2], "yes_no").item() == pytest.approx(0.7310586, abs=1e-6)
    # Two Yes spellings ("Yes", " Yes") add up: (e^2 + 1) / 11.475217 and (e^2 + 1) / (e^2 + 1 + e)
    assert p_yes_from_logits(logits, [0, 1], [2], "softmax").item() == pytest.approx(0.7310586, abs=1e-6)
    assert p_yes_from_logits(logits, [0, 1], [2], "yes_no").item() == pytest.approx(0.7552715, abs=1e-6)


def test_p_yes_from_top_logprobs_hand_computed():
    top = [
        {"token": "Yes", "logprob": math.log(0.6)},
        {"token": " No", "logprob": math.log(0.2)},
        {"token": "Maybe", "logprob": math.log(0.1)},
        {"token": "ĠYes", "logprob": math.log(0.05)},
    ]
    yes, no = ["Yes", " Yes"], ["No", " No"]
    assert p_yes_from_top_logprobs(top, yes, no, "softmax") == pytest.approx(0.65)
    assert p_yes_from_top_logprobs(top, yes, no, "yes_no") == pytest.approx(0.65 / 0.85)
    assert p_yes_from_top_logprobs(top[2:3], yes, no, "yes_no") is None  # neither Yes nor No listed
    assert p_yes_from_top_logprobs(top[1:3], yes, no, "yes_no") == 0.0
    assert p_yes_from_top_logprobs(top[1:3], yes, no, "softmax") == 0.0


# -- local backend ---------------------------------------------------------------------------------


def _direct_p_yes(judge_dir, query, pil_images, prob):
    """P(Yes) straight from the model's logits, one unpadded chat at a time, without the reward's code."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(judge_dir)
    model = AutoModelForImageTextToText.from_pretrained(judge_dir).eval()
    content = [{"type": "image"}, {"type": "text", "text": query}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    out = []
    yes = processor.tokenizer.convert_tokens_to_ids(["Yes", "ĠYes"])
    no = processor.tokenizer.convert_tokens_to_ids(["No", "ĠNo"])
    for image in pil_images:
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.no_grad():
            p = model(**inputs).logits[0, -1].double().softmax(-1)
        out.append(float(p[yes].sum() / (p[yes].sum() + p[no].sum())) if prob == "yes_no" else float(p[yes].sum()))
    return out


@pytest.mark.parametrize("prob", ["yes_no", "softmax"])
def test_local_pointwise_matches_direct_logits_and_is_deterministic(judge_dir, prob):
    from PIL import Image

    judge = local_judge(judge_dir, mode="pointwise", dimension="aesthetics", prob=prob, batch_size=3)
    assert judge.yes_ids == judge.vlm.tokenizer.convert_tokens_to_ids(["Yes", "ĠYes"])
    # Different sizes give different numbers of image tokens, so the batch of 3 is left-padded.
    samples = (
        images(2, seed=1, size=(3, 40, 56))
        + images(1, seed=2, size=(3, 90, 60))
        + images(1, seed=3, size=(3, 28, 28))
        + [None]
    )
    scores = judge(["a cup"] * 5, samples)
    assert scores == judge(["a cup"] * 5, samples)
    assert scores[-1] is None and all(0.0 <= s <= 1.0 for s in scores[:-1])
    pil = [Image.fromarray((t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for t in samples[:-1]]
    direct = _direct_p_yes(judge_dir, judge.query("aesthetics"), pil, prob)
    assert scores[:-1] == pytest.approx(direct, rel=1e-4, abs=1e-7)
    assert (max(scores[:-1]) - min(scores[:-1])) / max(scores[:-1]) > 1e-3  # the image matters


def test_local_pairwise_both_orders_and_dimensions(judge_dir):
    samples, drafts, refs = images(2, seed=2), images(2, seed=3), images(2, seed=4)
    one_way = local_judge(judge_dir, dimension="consistency")
    ab = one_way(["p"] * 2, samples, draft=drafts)
    ba = one_way(["p"] * 2, drafts, draft=samples)
    assert all(0.0 <= s <= 1.0 for s in ab + ba)
    assert ab != ba and ab != one_way(["p"] * 2, samples, draft=refs)  # both images are really shown, in order
    both = local_judge(judge_dir, dimension="consistency", both_orders=True)(["p"] * 2, samples, draft=drafts)
    assert both == pytest.approx([(p + 1.0 - q) / 2.0 for p, q in zip(ab, ba)], abs=1e-6)
    # A list of dimensions averages the per-dimension scores; compare_to picks the column.
    dims = ["consistency", "detail_fidelity"]
    mean = local_judge(judge_dir, dimension=dims, compare_to="reference")(
        ["p"] * 2, samples, draft=refs, reference=drafts
    )
    per_dim = [ab, local_judge(judge_dir, dimension="detail_fidelity")(["p"] * 2, samples, draft=drafts)]
    assert mean == pytest.approx([sum(v) / 2 for v in zip(*per_dim)], abs=1e-6)


def test_local_vlm_generate_is_greedy_and_batches_like_single_chats(vlm):
    from refiner_rl.scoring.base import to_pil
    from refiner_rl.vlm import build_conversation

    convs = [
        build_conversation("Describe it.", [to_pil(images(1, seed=1, size=(3, 40, 56))[0])]),
        build_conversation("Is Image A better than Image B?", [to_pil(x) for x in images(2, seed=2)]),
    ]
    ids, steps = vlm.generate_ids(vlm.encode(convs), max_new_tokens=4)
    # step 0 of greedy decoding is the argmax of the judge's next-token logits (both left-padded in a batch)
    assert [row[0] for row in ids] == vlm.next_token_logits(convs).argmax(-1).tolist()
    assert all(len(row) == step.shape[0] and 1 <= len(row) <= 4 for row, step in zip(ids, steps))
    batched = vlm.generate(convs, max_new_tokens=4)
    assert batched == [vlm.tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    assert batched == [vlm.generate([c], max_new_tokens=4)[0] for c in convs]


def test_local_torch_dtype(judge_dir):
    bf16 = local_judge(judge_dir, mode="pointwise", torch_dtype="bfloat16")
    assert next(bf16.vlm.model.parameters()).dtype == torch.bfloat16
    fp32 = local_judge(judge_dir, mode="pointwise")
    assert bf16.vlm is not fp32.vlm and fp32.vlm is local_judge(judge_dir, mode="pointwise", dimension="structure").vlm
    assert bf16(["p"] * 2, images(2)) == pytest.approx(fp32(["p"] * 2, images(2)), abs=0.05)
    with pytest.raises(ValueError, match="`torch_dtype: fp8` is not a torch dtype"):
        local_judge(judge_dir, torch_dtype="fp8")


def test_pairwise_missing_column_or_image(judge_dir):
    judge = local_judge(judge_dir, compare_to="reference")
    with pytest.raises(ValueError, match="needs the `reference` column; got: draft"):
        judge(["p"], images(1), draft=images(1))
    scores = judge(["p", "p"], images(2), reference=[None, images(1)[0]])
    assert scores[0] is None and 0.0 <= scores[1] <= 1.0


# -- server backend --------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", ["yes_no", "softmax"])
def test_server_scores_match_local(judge_dir, serve, prob):
    server = serve()
    options = {"dimension": ["text_alignment", "structure"], "both_orders": True, "prob": prob}
    samples, drafts = images(2, seed=5), images(2, seed=6, size=(3, 64, 48))
    prompts = ["restore the logo", "fix the small text on the label"]
    local = local_judge(judge_dir, **options)(prompts, samples, draft=drafts)
    # No `model`: the client asks /v1/models for it; base_url with or without /v1 both work.
    remote = server_judge(server.url, max_concurrency=4, **options)(prompts, samples, draft=drafts)
    assert remote == pytest.approx(local, rel=1e-4, abs=1e-7)
    assert ("/v1/models", None) in server.requests
    assert server.chat_requests == 2 * 2 * 2  # samples x dimensions x orders
    again = server_judge(server.url + "/v1", model="tiny-judge", mode="pointwise")(prompts, samples)
    assert again == pytest.approx(local_judge(judge_dir, mode="pointwise")(prompts, samples), abs=1e-5)


def test_server_slower_than_timeout_is_retried_then_none(serve, caplog):
    server = serve(delay=3.0)
    judge = server_judge(server.url, model="tiny-judge", mode="pointwise", timeout=0.3, max_retries=2, backoff=0.02)
    with caplog.at_level(logging.WARNING):
        assert judge(["p"], images(1)) == [None]
    assert server.chat_requests == 3  # the first try and two retries
    assert "1 of 1 requests got no answer" in caplog.text and "marked down for 60 s" in caplog.text
    assert judge(["p", "q"], images(2)) == [None, None] and server.chat_requests == 3  # down: nothing sent


def test_server_503_then_success_gives_a_real_score(judge_dir, serve):
    server = serve(fail_first=1)
    judge = server_judge(server.url, model="tiny-judge", mode="pointwise", max_retries=2)
    assert judge(["p"], images(1, seed=7)) == pytest.approx(
        local_judge(judge_dir, mode="pointwise")(["p"], images(1, seed=7)), abs=1e-5
    )
    assert server.chat_requests == 2
    always_failing = serve(fail_first=100)
    assert server_judge(always_failing.url, model="tiny-judge", mode="pointwise", max_retries=1)(["p"], images(1)) == [
        None
    ]
    assert always_failing.chat_requests == 2


def test_server_reply_without_yes_or_no_is_none(serve):
    server = serve()
    judge = server_judge(server.url, model="tiny-judge", mode="pointwise", yes_words=["Oui"], no_words=["Non"])
    assert judge(["p", "q"], images(2)) == [None, None]
    assert server.chat_requests == 2


def test_server_4xx_is_not_retried(serve, caplog):
    server = serve(max_top_logprobs=5)  # asking for 300 is a 400 Bad Request here
    with caplog.at_level(logging.WARNING):
        assert server_judge(server.url, model="tiny-judge", mode="pointwise", max_retries=3)(["p"], images(1)) == [None]
    assert server.chat_requests == 1
    assert "HTTP 400" in caplog.text and "not retried" in caplog.text


def test_connection_refused_is_none_and_marks_the_server_down(caplog):
    judge = server_judge(
        f"http://127.0.0.1:{free_port()}", model="m", mode="pointwise", max_retries=2, backoff=0.01, timeout=2.0
    )
    with caplog.at_level(logging.WARNING):
        assert judge(["p", "q"], images(2)) == [None, None]
    assert "failed 3 times, last: ConnectError" in caplog.text and judge.client.state.is_down()


def test_api_key_is_sent_as_bearer_and_never_logged(serve, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", secret)
    good = serve(api_key=secret)
    judge = server_judge(good.url, mode="pointwise", api_key_env="JUDGE_KEY")
    assert 0.0 <= judge(["p"], images(1))[0] <= 1.0
    assert {auth for _, auth in good.requests} == {f"Bearer {secret}"}
    assert secret not in repr(judge)

    wrong = serve(api_key="another-key")
    failing = serve(fail_first=100)
    with caplog.at_level(logging.WARNING):
        assert server_judge(wrong.url, model="tiny-judge", mode="pointwise", api_key_env="JUDGE_KEY", max_retries=2)(
            ["p"], images(1)
        ) == [None]
        assert server_judge(failing.url, model="tiny-judge", mode="pointwise", api_key_env="JUDGE_KEY", max_retries=1)(
            ["p"], images(1)
        ) == [None]
    assert wrong.chat_requests == 1  # 401 is not retried
    assert "HTTP 401" in caplog.text and "HTTP 503" in caplog.text
    assert secret not in caplog.text


# -- the server itself -----------------------------------------------------------------------------


def _post(url, body, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def test_server_speaks_the_openai_schema(serve):
    from refiner_rl.scoring.base import to_pil
    from refiner_rl.vlm.questions import png_data_url

    server = serve()
    models = json.loads(urllib.request.urlopen(server.url + "/v1/models", timeout=10).read())
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-judge"
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(to_pil(images(1)[0]))}},
                {"type": "text", "text": "Is this good? Answer Yes or No."},
            ],
        }
    ]
    reply = _post(
        server.url + "/v1/chat/completions",
        {
            "model": "tiny-judge",
            "messages": messages,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 4,
            "temperature": 0,
        },
    )
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-judge"
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 3 and reply["usage"]["completion_tokens"] == len(content)
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] == pytest.approx(tops[0], abs=1e-6)  # greedy: the chosen token is the top one
        assert entry["bytes"] == list(entry["token"].encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(
            server.url + "/v1/chat/completions",
            {
                "model": "tiny-judge",
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}],
                    }
                ],
            },
        )
    assert err.value.code == 400 and "base64 data URL" in json.loads(err.value.read())["error"]["message"]


@pytest.mark.slow
def test_server_command_line(judge_dir):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "refiner_rl.vlm.server",
        "--model",
        judge_dir,
        "--port",
        str(port),
        "--min-pixels",
        str(PIXELS),
        "--max-pixels",
        str(PIXELS),
        "--served-model-name",
        "cli-judge",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "server did not start in 60 s"
                time.sleep(0.2)
        scores = server_judge(f"http://127.0.0.1:{port}", mode="pointwise")(["p"], images(1))
        assert 0.0 <= scores[0] <= 1.0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
