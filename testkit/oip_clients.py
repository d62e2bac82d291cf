"""Triton's own clients (tritonclient[grpc] and [http]) calling our server: what a Triton or KServe user would run.

Run as a script in its own process (tests/test_oip.py): tritonclient registers the `inference` protobuf package
under another file name, and one process cannot hold both its copy and ours. Writes every outcome to OUT (.npz:
arrays; `<name>.error` entries: the exception's text and status).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

MODEL = "mnist-cdcgan"
SEEDS = "0-7"
LABELS = "3"


def main(grpc_url: str, http_url: str, out: str) -> None:
    results: dict[str, np.ndarray] = {}
    errors: dict[str, dict] = {}
    g, h = tg.InferenceServerClient(grpc_url), th.InferenceServerClient(http_url)

    meta = {
        "grpc_live": g.is_server_live(), "grpc_ready": g.is_server_ready(), "http_live": h.is_server_live(),
        "http_ready": h.is_server_ready(), "grpc_model_ready": g.is_model_ready(MODEL),
        "http_model_ready": h.is_model_ready(MODEL), "grpc_unknown_ready": g.is_model_ready("nope"),
        "http_unknown_ready": h.is_model_ready("nope"),
        "grpc_server": g.get_server_metadata(as_json=True), "http_server": h.get_server_metadata(),
        "grpc_model": g.get_model_metadata(MODEL, as_json=True), "http_model": h.get_model_metadata(MODEL),
    }  # fmt: skip

    def seeded(client, mod, datatype: str | None, binary: bool = True):
        """Seeds and labels as request parameters, no input tensors; FP32 images, or UINT8 when asked."""
        parameters = {"seeds": SEEDS, "labels": LABELS} | ({"datatype": datatype} if datatype else {})
        outputs = [th.InferRequestedOutput("images", binary_data=binary)] if mod is th else None
        return client.infer(MODEL, [], outputs=outputs, parameters=parameters)

    for tag, client, mod in (("grpc", g, tg), ("http", h, th)):
        results[f"{tag}_seeds_fp32"] = seeded(client, mod, None).as_numpy("images")
        results[f"{tag}_seeds_uint8"] = seeded(client, mod, "UINT8").as_numpy("images")
        if mod is th:
            results["http_seeds_uint8_json"] = seeded(client, mod, "UINT8", binary=False).as_numpy("images")

        z = np.random.default_rng(0).standard_normal((3, 100), dtype=np.float32)
        y = np.zeros((3, 10), np.float32)
        y[np.arange(3), [1, 4, 9]] = 1
        results["z"], results["y"] = z, y
        for binary in (True, False) if mod is th else (True,):
            inputs = [mod.InferInput("z", list(z.shape), "FP32"), mod.InferInput("y", list(y.shape), "FP32")]
            for tensor, values in zip(inputs, (z, y), strict=True):
                tensor.set_data_from_numpy(values, **({"binary_data": binary} if mod is th else {}))
            name = f"{tag}_tensors" + ("" if binary else "_json")
            results[name] = client.infer(MODEL, inputs).as_numpy("images")

        # An edit: the direction and strengths as parameters, as any OIP client can send them.
        edit = {"seeds": SEEDS, "labels": LABELS, "direction": "slant", "strengths": "-2,0,2", "datatype": "UINT8"}
        outputs = [th.InferRequestedOutput("images", binary_data=True)] if mod is th else None
        results[f"{tag}_edit"] = client.infer(MODEL, [], outputs=outputs, parameters=edit).as_numpy("images")

        def refused(name: str, call) -> None:
            try:
                call()
                errors[name] = {"status": "none", "message": "no error"}
            except InferenceServerException as e:
                errors[name] = {"status": str(e.status()), "message": e.message()}

        refused(f"{tag}_unknown_model", lambda c=client: c.get_model_metadata("nope"))
        wrong = mod.InferInput("z", [2, 3], "FP32")
        wrong.set_data_from_numpy(np.zeros((2, 3), np.float32))
        refused(f"{tag}_wrong_shape", lambda c=client, w=wrong: c.infer(MODEL, [w]))
        integers = mod.InferInput("z", [1, 100], "INT64")
        integers.set_data_from_numpy(np.zeros((1, 100), np.int64))
        refused(f"{tag}_wrong_datatype", lambda c=client, t=integers: c.infer(MODEL, [t]))
        refused(f"{tag}_bad_seeds", lambda c=client: c.infer(MODEL, [], parameters={"seeds": "0-x"}))
        refused(f"{tag}_too_many", lambda c=client: c.infer(MODEL, [], parameters={"seeds": "0-99999"}))
        tilt = edit | {"direction": "tilt"}
        refused(f"{tag}_bad_direction", lambda c=client, p=tilt: c.infer(MODEL, [], parameters=p))
    np.savez(out, **results)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "errors": errors}, f, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:4])
