from services.pulse.app import create_app
from shared.service import run_service

run_service("pulse", create_app)
