"""engine.he and the ciphertext encoding of engine.serde: round trips and refusal rules."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tenseal")

from engine import he, serde
from engine.server.aggregator import HEAccumulator
from protos import federated_pb2 as pb


@pytest.fixture(scope="module")
def contexts():
    private, public = he.make_contexts()
    ts = he.tenseal()
    return ts.context_from(private), ts.context_from(public)


def test_ciphertext_travels_as_ckks_bytes_through_the_chunked_stream(contexts):
    private, _ = contexts
    value = np.linspace(-1, 1, 5000, dtype=np.float32).reshape(50, 100)
    ct = he.encrypt(private, value, factor=2.0)
    params = {"w": ct, "b": np.ones(3, np.float32)}
    frames = list(serde.encode_model_stream(pb.CurrentModel(), params, chunk_bytes=64 << 10))
    assert len(frames) > 3  # chunked like any tensor
    header = serde.parse_header_frame(frames[0], pb.CurrentModel)
    assert header.data.params[0].array.dtype == serde.CKKS
    _, got = serde.decode_model_stream(frames, pb.CurrentModel)  # a site takes ciphertexts
    assert he.is_ciphertext(got["w"]) and not he.is_ciphertext(got["b"])
    np.testing.assert_allclose(he.decrypt(private, got["w"]), 2 * value, atol=1e-4)
    assert he.decrypt(private, got["w"]).dtype == np.float32


def test_receivers_refuse_ciphertexts_unless_they_run_he(contexts):
    private, _ = contexts
    params = {"w": he.encrypt(private, np.ones(4, np.float32))}
    frames = list(serde.encode_model_stream(pb.Contribution(), params))
    expected = {"w": ("float32", (4,))}
    with pytest.raises(serde.SerdeError, match="does not run homomorphic encryption"):
        serde.decode_model_stream(frames, pb.Contribution, expected)
    _, got = serde.decode_model_stream(frames, pb.Contribution, expected, ciphertexts=True)
    assert he.is_ciphertext(got["w"])
    # a ciphertext only for a float variable; plaintext never where the model is encrypted
    with pytest.raises(serde.SerdeError, match="only float variables"):
        serde.decode_model_stream(frames, pb.Contribution, {"w": ("int64", (4,))}, ciphertexts=True)
    plain = list(serde.encode_model_stream(pb.Contribution(), {"w": np.ones(4, np.float32)}))
    with pytest.raises(serde.SerdeError, match="arrived in plaintext"):
        serde.decode_model_stream(
            plain, pb.Contribution, {"w": (serde.CKKS, (99,))}, ciphertexts=True
        )


def test_ckks_header_must_be_one_dimensional_bytes():
    header = pb.Contribution()
    header.data.params.add(name="w", array=pb.NDArray(dtype=serde.CKKS, shape=[2, 3]))
    assembler = serde.ModelAssembler(pb.Contribution, ciphertexts=True)
    with pytest.raises(serde.SerdeError, match="1-D non-empty"):
        assembler.on_header(header)


def test_garbage_is_not_a_ciphertext(contexts):
    _, public = contexts
    with pytest.raises(he.HEError, match="bad magic"):
        he.plain_spec(np.zeros(100, np.uint8))
    acc = HEAccumulator(public)
    bad = np.frombuffer(he.MAGIC + b"\x02\x00\x00\x00{}", np.uint8).copy()
    screening = acc.screen({"w": bad.view(serde.CiphertextArray)}, {"w": np.ones(4, np.float32)})
    assert screening.variable == "w" and "bad header" in screening.problem


def test_he_accumulator_is_weighted_fedavg_without_the_secret_key(contexts):
    private, public = contexts
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(10_000).astype(np.float32)}
    deltas = [rng.standard_normal(10_000).astype(np.float32) for _ in range(3)]
    n_iters = [1, 2, 5]
    acc = HEAccumulator(public)
    for i, (d, n) in enumerate(zip(deltas, n_iters, strict=True)):
        ct = {"w": he.encrypt(private, d, factor=n)}
        assert acc.screen(ct, base).variable is None
        acc.add(f"s{i}", ct, weight=float(n), ct_factor=1.0)
    new = acc.apply(base)
    expect = base["w"] + sum(n * d for d, n in zip(deltas, n_iters, strict=True)) / sum(n_iters)
    assert np.max(np.abs(he.decrypt(private, new["w"]) - expect)) < 1e-4


def test_project_parameters_are_checked():
    assert he.CKKSParams.from_project({}) == he.DEFAULT_PARAMS
    p = he.CKKSParams.from_project(
        {
            "poly_modulus_degree": 16384,
            "coeff_mod_bit_sizes": [60, 40, 40, 60],
            "global_scale": 2**40,
        }
    )
    assert p.poly_modulus_degree == 16384 and p.global_scale_bits == 40
    with pytest.raises(he.HEError, match="poly_modulus_degree"):
        he.CKKSParams.from_project({"poly_modulus_degree": 1000})
    with pytest.raises(he.HEError, match="unknown key"):
        he.CKKSParams.from_project({"scale": 3})


def test_he_event_summary_state_and_round_panel_line():
    from engine.events import HomomorphicEncryptionApplied, event_from_dict  # deferred: one test
    from engine.site.state import SiteState  # deferred: one test
    from fltui.widgets.round_panel import _he_line  # deferred: the console's line, one test

    enc = HomomorphicEncryptionApplied(
        site="site-a",
        round=2,
        direction="encrypt",
        what="round update",
        variables=3,
        plain_bytes=4 << 20,
        cipher_bytes=230 << 20,
        seconds=0.42,
    )
    assert enc.summary() == (
        "round 2 round update encrypted (CKKS): 3 variables, 4.0 MB -> 230.0 MB in 0.42 s"
    )
    dec = HomomorphicEncryptionApplied(
        site="site-a", round=3, direction="decrypt", what="global model", seconds=0.11
    )
    state = SiteState(site="site-a")
    assert _he_line(state) == ""  # no line without HE
    for event in (enc, event_from_dict(dec.to_dict())):  # as the worker forwards it
        assert "round" in state.apply(event)
    assert _he_line(state) == "updates encrypted (CKKS) · encrypt 0.4 s · decrypt 0.1 s"
    # it survives the trip to a console (the service's snapshot)
    assert _he_line(SiteState.from_dict(state.to_dict())) == _he_line(state)
