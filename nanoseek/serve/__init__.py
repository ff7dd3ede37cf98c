"""`nanoseek serve`: an OpenAI-compatible HTTP server over the continuous-batching Engine.

    protocol.py      request schemas, error bodies, reasoning split by token id, stop strings
    worker.py        EngineLoop: the engine in one background thread; Prometheus metrics
    handler.py       request reading and checks shared by the routes; Job (one HTTP request's engine requests)
    chat.py          POST /v1/chat/completions
    completions.py   POST /v1/completions
    app.py           create_app: error bodies, api key, /v1/models, /health, /metrics, the page
    server.py        load_app (checkpoint -> app) and ServerThread (uvicorn on a local port, for tests)
    static/chat.html the chat page served at /
"""
