"""`nanoseek serve`: an OpenAI-compatible HTTP server over the continuous-batching Engine.

    protocol.py      request schemas, error bodies, reasoning split by token id, stop strings
    worker.py        EngineLoop: the engine in one background thread; Prometheus metrics
    app.py           the FastAPI routes
    server.py        load_app (checkpoint -> app) and ServerThread (uvicorn on a local port, for tests)
    static/chat.html the chat page served at /
"""
