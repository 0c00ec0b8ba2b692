from services.enrollment.app import create_app
from shared.service import run_service

run_service("enrollment", create_app)
