from services.cells.app import create_app
from shared.service import run_service

run_service("cells", create_app)
