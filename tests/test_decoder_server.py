"""The vLLM decoder backend's own parts, without vLLM: the export of a decoder, the client's
reading of a streamed completion (a stand-in server speaking the OpenAI stream format), which
server serves which decoder, and the methods' path through it. The equal-answers test against a
real vLLM server is in tests/test_serving.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load_file

from app.engine.decoder_server import DecoderServers, ServedDecoder, Streamed, export_decoder, fingerprint
from app.engine.service import AskRequest, Studio
from app.engine.settings import Settings
from model.errors import UserError
from model.generation import Sampling

DOC = "The vault code is 4417. " * 6 + "Nothing else happened that day."


class StandIn(BaseHTTPRequestHandler):
    """Answers /v1/models and /v1/completions as a vLLM server does, with `pieces` as the reply."""

    pieces = ["The", " code", " is", " 4417."]
    served: list[str] = []
    bodies: list[dict] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": name} for name in self.served]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        if body["model"] not in self.served:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error": "model not found"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        pieces = self.pieces[:body["max_tokens"]]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            reason = ("length" if len(pieces) == body["max_tokens"] else "stop") if last else None
            chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": reason, "token_ids": [10 + i]}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": len(pieces)}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
def stand_in():
    StandIn.served, StandIn.bodies = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_streamed_completion_comes_back_in_pieces_with_its_count_and_end(stand_in):
    StandIn.served = ["m"]
    done = Streamed()
    client = ServedDecoder(stand_in, "m", torch.float32)
    pieces = list(client.stream(torch.zeros(5, 8), 16, [2, 7], Sampling(), done))
    assert pieces == StandIn.pieces and done.tokens == 4 and done.finish_reason == "stop"
    assert done.token_ids == [10, 11, 12, 13]
    sent = StandIn.bodies[-1]
    assert sent["stop_token_ids"] == [2, 7] and sent["temperature"] == 0.0 and sent["stream"] is True
    assert isinstance(sent["prompt_embeds"], str) and len(sent["prompt_embeds"]) > 5 * 8 * 4  # base64 of the tensor
    cut = Streamed()
    assert list(client.stream(torch.zeros(5, 8), 2, [], Sampling(), cut)) == StandIn.pieces[:2]
    assert cut.finish_reason == "length"


def test_a_refused_or_missing_server_is_one_clear_error(stand_in):
    with pytest.raises(UserError, match="refused the request"):
        list(ServedDecoder(stand_in, "unknown", torch.float32).stream(torch.zeros(2, 4), 4, [], Sampling()))
    with pytest.raises(UserError, match="cannot be reached"):
        list(ServedDecoder("http://127.0.0.1:9", "m", torch.float32).stream(torch.zeros(2, 4), 4, [], Sampling()))


def test_the_export_is_the_decoder_in_safetensors_written_once(tiny_lclm_factory, tmp_path):
    lclm = tiny_lclm_factory(family="qwen3", ratio=4, pooling="mean", window=16)
    first = export_decoder(lclm.decoder, lclm.decoder_tokenizer, lclm.checkpoint_id, tmp_path)
    assert first.name == fingerprint(lclm.checkpoint_id, torch.float32) and (first / "config.json").is_file()
    weights = {}
    for f in first.glob("*.safetensors"):
        weights.update(load_file(f))
    embed = lclm.decoder.get_input_embeddings().weight
    assert any(t.shape == embed.shape and torch.equal(t, embed.detach()) for t in weights.values())  # tag rows too
    assert not list(first.glob("*.bin")) and not list(first.glob("*.pt"))
    stamp = (first / "config.json").stat().st_mtime_ns
    assert export_decoder(lclm.decoder, lclm.decoder_tokenizer, lclm.checkpoint_id, tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp


def test_a_running_server_is_used_for_the_decoders_it_lists(stand_in, tiny_lclm_factory, tmp_path):
    lclm = tiny_lclm_factory(family="qwen3", ratio=4, pooling="mean", window=16)
    name = fingerprint(lclm.checkpoint_id, torch.float32)
    servers = DecoderServers(tmp_path, [stand_in], start=False)
    with pytest.raises(UserError, match="no decoder server serves"):
        servers.client(lclm.decoder, lclm.decoder_tokenizer, lclm.checkpoint_id)
    StandIn.served = [name]
    client = servers.client(lclm.decoder, lclm.decoder_tokenizer, lclm.checkpoint_id)
    assert client.url == stand_in and client.model == name


def test_answers_decode_through_the_server_and_presses_say_they_do_not(stand_in, tiny_checkpoint, tmp_path,
                                                                         tiny_lclm_factory):
    """LCLM, EXPAND and full context send their prompt embeddings to the server and stream its
    reply (EXPAND one reply per round); full context sends more positions than the LCLM."""
    studio = Studio(Settings(data_dir=tmp_path, decoder="vllm", decoder_urls=(stand_in,), dtype="float32"),
                    checkpoint=str(tiny_checkpoint))
    model = studio.model(str(tiny_checkpoint))
    StandIn.served = [fingerprint(model.checkpoint_id, torch.float32)]
    for mode in ("lclm", "expand", "full"):
        events = list(studio.ask(AskRequest(DOC, "What is the vault code?", method=mode, max_new_tokens=8)))
        answer = events[-1].answer
        assert answer.text == "The code is 4417." and answer.measurement.ttft_ms > 0
        assert any("decoded by a vLLM server" in w for w in answer.warnings)
        rounds = max(1, sum(e.kind == "round" for e in events))
        assert "".join(e.text for e in events if e.kind == "token") == "The code is 4417." * rounds
    lclm_sent, full_sent = (len(b["prompt_embeds"]) for b in (StandIn.bodies[0], StandIn.bodies[-1]))
    assert full_sent > lclm_sent
    pressed = list(studio.ask(AskRequest(DOC, "What is the vault code?", method="snapkv", max_new_tokens=2)))[-1]
    assert any("no vLLM path" in w for w in pressed.answer.warnings)


def test_the_settings_refuse_urls_without_the_vllm_decoder(tmp_path):
    with pytest.raises(ValueError, match="decoder must be one of"):
        Settings(data_dir=tmp_path, decoder="tgi")
    with pytest.raises(ValueError, match="give them with decoder vllm"):
        Settings(data_dir=tmp_path, decoder_urls=("http://127.0.0.1:8000",))


def test_a_server_starts_once_and_a_start_blocks_no_other_decoder(monkeypatch, tmp_path, tiny_lclm_factory):
    """Two questions for a decoder with no server start one; a question for a decoder already
    served is answered while another decoder's server is starting."""
    import time

    from app.engine import decoder_server

    started, release = [], threading.Event()

    def start(self, timeout_s=0):
        started.append(self.name)
        if self.name == "slow":
            release.wait(10)
        return self

    monkeypatch.setattr(decoder_server.DecoderServer, "start", start)
    monkeypatch.setattr(decoder_server.DecoderServer, "stop", lambda self: None)
    monkeypatch.setattr(decoder_server, "export_decoder", lambda *a: tmp_path)
    monkeypatch.setattr(decoder_server, "fingerprint", lambda decoder_id, dtype: decoder_id)
    lclm = tiny_lclm_factory(family="qwen3", ratio=4, pooling="mean", window=16)
    servers = DecoderServers(tmp_path)
    servers.client(lclm.decoder, lclm.decoder_tokenizer, "fast")
    slow = [threading.Thread(target=servers.client, args=(lclm.decoder, lclm.decoder_tokenizer, "slow"))
            for _ in range(2)]
    for t in slow:
        t.start()
    time.sleep(0.3)
    begun = time.perf_counter()
    assert servers.client(lclm.decoder, lclm.decoder_tokenizer, "fast").model == "fast"
    assert time.perf_counter() - begun < 1.0  # not behind the slow start
    release.set()
    for t in slow:
        t.join(10)
    assert started == ["fast", "slow"]  # one start each
