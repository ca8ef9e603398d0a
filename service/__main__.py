"""``python -m service``: serve every model under PSN_MODEL_DIR on PSN_HOST:PSN_PORT (see supervisor.py)."""

from service.supervisor import main

if __name__ == "__main__":
    main()
