import asyncio
import os

import msgpack
import pytest
import zmq
import zmq.asyncio

from dyn import PROTOCOL_VERSION
from dyn.control.keys import DeploymentKeys
from dyn.control.messages import CONTROL_CODEC, Heartbeat, Register
from dyn.control.requests import REQUEST_CODEC, GenerateRequest
from dyn.control.sampling import SamplingParams
from dyn.control.sockets import BadMessages, Security, client_socket, decode_or_record, server_socket
from dyn.errors import ProtocolError


def test_round_trip_keeps_every_field():
    msg = Register(process_id="decode-0", role="decode", node="tray01", pid=42, version="0.1.0",
                   addresses={"request": "tcp://127.0.0.1:5000"}, gpus=[0, 1])
    assert CONTROL_CODEC.decode(CONTROL_CODEC.encode(msg)) == msg
    req = GenerateRequest(request_id="r1", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4))
    assert REQUEST_CODEC.decode(REQUEST_CODEC.encode(req)) == req


def test_sampling_travels_typed_and_is_checked_field_by_field():
    sp = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, seed=-(2**63), stop_token_ids=(2, 9),
                        ignore_eos=True, logprobs=True)
    got = REQUEST_CODEC.decode(REQUEST_CODEC.encode(GenerateRequest("r", [1], sampling=sp)))
    assert isinstance(got, GenerateRequest) and got.sampling == sp and type(got.sampling.stop_token_ids) is tuple
    # a sender that names only some fields (as version-1 frontends did) gets the defaults for the rest
    partial = msgpack.packb([PROTOCOL_VERSION, "generate", {"request_id": "r", "prompt_token_ids": [1],
                                             "sampling": {"max_tokens": 4, "temperature": 1}}])
    got = REQUEST_CODEC.decode(partial)
    assert got.sampling == SamplingParams(max_tokens=4, temperature=1.0)  # type: ignore[attr-defined]
    assert type(got.sampling.temperature) is float  # type: ignore[attr-defined]


@pytest.mark.parametrize("sampling, reason", [
    ({"max_tokens": "4"}, r"generate\.sampling\.max_tokens: .*does not match"),
    ({"temperature": True}, r"sampling\.temperature: expected a number"),
    ({"stop_token_ids": 5}, r"sampling\.stop_token_ids: expected a list"),
    ({"stop_token_ids": [1, "x"]}, r"sampling\.stop_token_ids: expected an integer"),
    ({"beam_width": 4}, r"sampling: unknown fields \['beam_width'\]"),
    ([4], r"sampling: fields are not a map"),
])
def test_mistyped_sampling_is_a_protocol_error(sampling, reason):
    frame = msgpack.packb([PROTOCOL_VERSION, "generate", {"request_id": "r", "prompt_token_ids": [1], "sampling": sampling}])
    with pytest.raises(ProtocolError, match=reason):
        REQUEST_CODEC.decode(frame)


@pytest.mark.parametrize("token_ids, reason", [
    ([1, 2.0], r"generate\.prompt_token_ids: expected an integer, got float"),
    ([1, True], r"generate\.prompt_token_ids: expected an integer, got bool"),
    ([1, None], r"generate\.prompt_token_ids: expected an integer, got NoneType"),
    ({"0": 1}, r"generate\.prompt_token_ids: expected a list, got dict"),
])
def test_token_ids_are_checked_item_by_item(token_ids, reason):
    frame = msgpack.packb([PROTOCOL_VERSION, "generate", {"request_id": "r", "prompt_token_ids": token_ids}])
    with pytest.raises(ProtocolError, match=reason):
        REQUEST_CODEC.decode(frame)
    ok = msgpack.packb([PROTOCOL_VERSION, "generate", {"request_id": "r", "prompt_token_ids": [0, 2**40, 7]}])
    assert REQUEST_CODEC.decode(ok).prompt_token_ids == [0, 2**40, 7]  # type: ignore[attr-defined]


@pytest.mark.parametrize("frame, reason", [
    (b"\xc1garbage", "undecodable"),
    (msgpack.packb([99, "heartbeat", {}]), "protocol version"),
    (msgpack.packb([PROTOCOL_VERSION, "nope", {}]), "unknown message type"),
    (msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"process_id": "x"}]), "missing field"),
    (msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"process_id": 5, "state": "ready"}]), "expected str"),
    (msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"process_id": "x", "state": "dancing"}]), "not one of"),
    (msgpack.packb([PROTOCOL_VERSION, "heartbeat", {"process_id": "x", "state": "ready", "evil": 1}]), "unknown fields"),
    (msgpack.packb({"a": 1}), r"not \[version"),
])
def test_malformed_frames_raise_protocol_error(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        CONTROL_CODEC.decode(frame)


def test_bad_messages_are_counted_not_raised():
    bad = BadMessages("test")
    for _ in range(3):
        assert decode_or_record(CONTROL_CODEC, os.urandom(64), bad) is None
    assert bad.total == 3


def test_curve_admits_authorized_and_refuses_strangers():
    async def scenario():
        keys = DeploymentKeys.generate(["daemon", "good"])
        ctx = zmq.asyncio.Context()
        server_sec = Security.from_keys(keys.for_process("daemon"))
        server = server_socket(ctx, zmq.ROUTER, "tcp://127.0.0.1:*", server_sec)
        address = server.getsockopt_string(zmq.LAST_ENDPOINT)
        good = client_socket(ctx, zmq.DEALER, address, Security.from_keys(keys.for_process("good")),
                             identity=b"good")
        stranger_keys = DeploymentKeys.generate(["evil"])  # same shape, wrong deployment
        evil_proc = keys.for_process("good").__class__(
            server_public=keys.server_public, server_secret="", public=stranger_keys.clients["evil"][0],
            secret=stranger_keys.clients["evil"][1])
        evil = client_socket(ctx, zmq.DEALER, address, Security(keys=evil_proc))
        hb = Heartbeat(process_id="x", state="ready")
        await evil.send(CONTROL_CODEC.encode(hb))
        await good.send(CONTROL_CODEC.encode(hb))
        ident, data = await asyncio.wait_for(server.recv_multipart(), 5)
        assert ident == b"good"
        assert CONTROL_CODEC.decode(data) == hb
        assert not await server.poll(500)  # the stranger never does
        assert server_sec.authorizer.num_denied >= 1
        for s in (good, evil, server):
            s.close()
        server_sec.stop()
        ctx.term()

    asyncio.run(scenario())
