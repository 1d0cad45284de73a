"""One module or package per API (native, mflux, openai, a1111, comfy): routes, request reading and a renderer
of its own error shape, over gateway.core; none imports another."""
