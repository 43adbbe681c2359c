"""The render service: producers submit, approve, watch and download renders through a job
queue on Ray Jobs (``anim serve``; the HTTP contract is in ``app.py``, the client in ``client.py``).

    db.py       users, tokens, sessions, the job table (Alembic migrations in migrations/)
    auth.py     passwords (Argon2id), API tokens and session cookies (kept as digests)
    cluster.py  the Ray cluster: the studio's (RAY_ADDRESS) or a local head of the service's own
    jobs.py     uploads checked and planned, attempts submitted, states reconciled against Ray
    app.py      create_app(settings): the FastAPI app (and the web page's router, web.py)
    client.py   ServiceClient for the CLI, the nightly batch and tests
"""
