from services.labs.app import create_app
from shared.service import run_service

run_service("labs", create_app)
