from services.outcomes.app import create_app
from shared.service import run_service

run_service("outcomes", create_app)
