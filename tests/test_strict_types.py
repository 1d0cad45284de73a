"""Fields take the JSON type they name: a boolean only true or false, an integer only a number without
a fraction, a number only a number; never a string or a boolean in their place. What real clients send
(mflux-server's string seed, A1111's integer cfg_scale, 512.0 for an integer) still passes. Over the
real gateway and the tiny-sdxl worker."""

from __future__ import annotations

import pytest

SMALL = {"prompt": "a red boat", "width": 64, "height": 64, "steps": 2}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"priority": "yes"}, "priority", "must be true or false, got a string 'yes'"),
        ({"priority": 1}, "priority", "must be true or false, got 1"),
        ({"use_refiner": "true"}, "use_refiner", "must be true or false"),
        ({"cache": 0}, "cache", "must be true or false"),
        ({"steps": True}, "steps", "must be an integer, got true"),
        ({"width": "512"}, "width", "must be an integer, got a string '512'"),
        ({"height": 64.5}, "height", "must be an integer, got 64.5"),
        ({"n": "2"}, "n", "must be an integer"),
        ({"quality": False}, "quality", "must be an integer, got false"),
        ({"guidance": "7"}, "guidance", "must be a number, got a string '7'"),
        ({"strength": True}, "strength", "must be a number, got true"),
        ({"timeout_s": "60"}, "timeout_s", "must be a number"),
        ({"loras": {"pixel-art": "0.8"}}, "loras.pixel-art", "must be a number"),
        ({"seed": True}, "seed", "whole number"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/jobs", "/api/generate"])
async def test_a_field_of_another_json_type_is_refused_by_name(service, http, path, change, field, words):
    async with http.post(f"{service.url}{path}", json={**SMALL, **change}) as r:
        assert r.status == 400, await r.text()
        answer = await r.json()
    assert answer["field"] == field and words in answer["error"], answer


async def test_what_mflux_clients_send_passes(service, http):
    """mflux-server's web UI (a string seed, null init_image, guidance 3.5) and its Python client (no
    seed), and a number seed; an integer written as 64.0 counts as one (JSON Schema's rule)."""
    web_ui = {**SMALL, "guidance": 3.5, "format": "JPEG", "quality": 85, "priority": False, "init_image": None, "seed": "42"}
    for body in (web_ui, {**web_ui, "seed": 42}, {k: v for k, v in web_ui.items() if k != "seed"}, {**SMALL, "width": 64.0}):
        async with http.post(f"{service.url}/api/generate", json=body) as r:
            assert r.status == 200, await r.text()
    async with http.post(f"{service.url}/v1/jobs", json={**SMALL, "width": 64.0, "seed": 7}) as r:
        job = await r.json()
    assert job["request"]["width"] == 64 and job["seed"] == 7


@pytest.mark.parametrize(
    ("change", "field"),
    [({"steps": "2"}, "steps"), ({"send_images": "false"}, "send_images"), ({"cfg_scale": True}, "cfg_scale"), ({"width": "64"}, "width"), ({"batch_size": 1.5}, "batch_size")],
)
async def test_a1111_fields_of_another_json_type_are_refused_by_name(service, http, change, field):
    async with http.post(f"{service.url}/sdapi/v1/txt2img", json={**SMALL, **change}) as r:
        assert r.status == 422, await r.text()
        [problem] = (await r.json())["detail"]
    assert problem["loc"] == ["body", field] and "must be" in problem["msg"], problem


async def test_what_a1111_clients_send_passes(service, http):
    """The defaults the webuiapi client sends with every txt2img that this server takes: integers where A1111
    has floats (cfg_scale 7, s_noise 1), -1 seeds, false flags."""
    body = {
        **SMALL, "seed": -1, "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
        "batch_size": 1, "n_iter": 1, "cfg_scale": 7, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
        "do_not_save_grid": False, "negative_prompt": "", "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
        "override_settings": {}, "override_settings_restore_afterwards": True, "send_images": True, "save_images": False,
        "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
        "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    }
    async with http.post(f"{service.url}/sdapi/v1/txt2img", json=body) as r:
        assert r.status == 200, await r.text()
        assert len((await r.json())["images"]) == 1


@pytest.mark.parametrize(
    ("change", "param"),
    [({"n": "2"}, "n"), ({"stream": "false"}, "stream"), ({"steps": True}, "steps"), ({"guidance": "7"}, "guidance"), ({"seed": "7"}, "seed")],
)
async def test_openai_fields_of_another_json_type_are_refused_by_name(service, http, change, param):
    async with http.post(f"{service.url}/v1/images/generations", json={"prompt": "a pier", "size": "64x64", **change}) as r:
        assert r.status == 400, await r.text()
        error = (await r.json())["error"]
    assert error["param"] == param and "must be" in error["message"], error
