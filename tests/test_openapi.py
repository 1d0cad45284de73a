"""/openapi.json comes from the pydantic models that validate requests; /swagger works offline."""

from __future__ import annotations

from schemas.request import GenerateRequest


async def test_openapi_describes_every_mflux_endpoint(service, http):
    async with http.get(f"{service.url}/openapi.json") as r:
        spec = await r.json()
    assert spec["openapi"].startswith("3.")
    for path in ["/api/generate", "/api/status", "/api/image", "/api/cancel", "/api/tasks", "/api/clear", "/api/ls", "/api/ps", "/api/load", "/v1/jobs"]:
        assert path in spec["paths"], path
    schema = spec["components"]["schemas"]["GenerateRequest"]
    assert set(schema["properties"]) == set(GenerateRequest.model_fields)
    assert schema["required"] == ["prompt"]


async def test_swagger_ui_is_served_from_the_package(service, http):
    async with http.get(f"{service.url}/swagger") as r:
        assert r.status == 200
        page = await r.text()
    assert "/openapi.json" in page and "http" not in page.split("<script>")[-1].split("openapi.json")[0]
    for asset in ["/swagger/static/swagger-ui-bundle.js", "/swagger/static/swagger-ui.css"]:
        async with http.get(f"{service.url}{asset}") as r:
            assert r.status == 200 and len(await r.read()) > 10_000, asset


async def test_cors_is_open_like_mflux_server(service, http):
    headers = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"}
    async with http.options(f"{service.url}/api/generate", headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    async with http.get(f"{service.url}/api/ls", headers={"Origin": "http://elsewhere.example"}) as r:
        assert r.headers["Access-Control-Allow-Origin"] == "*"


async def test_web_ui_names_the_model(service, http):
    async with http.get(f"{service.url}/") as r:
        assert r.status == 200 and "imagegen" in await r.text()
