"""A real OAuth 2.0 authorization server for tokend's interop test: django-oauth-toolkit on
127.0.0.1 with refresh-token rotation and reuse protection on (the strictest settings), short
access tokens, a confidential client, and a stand-in "browser". TOKEND_PEER_GRACE_SECONDS sets
REFRESH_TOKEN_GRACE_PERIOD_SECONDS (default 0: a spent refresh token is refused at once).

    python peer.py setup  DB CLIENT_ID CLIENT_SECRET REDIRECT_URI
    python peer.py serve  DB PORT
    python peer.py browse BASE_URL AUTHORIZE_URL      # logs in as alice, approves, delivers the redirect
    python peer.py refresh BASE_URL CLIENT_ID CLIENT_SECRET REFRESH_TOKEN   # prints the HTTP status and error
"""
import os
import sys

import django
from django.conf import settings


def configure(db):
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tokend-interop-test-only",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "oauth2_provider",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db}},
        USE_TZ=True,
        LOGIN_URL="/login/",
        OAUTH2_PROVIDER={
            "ACCESS_TOKEN_EXPIRE_SECONDS": 6,
            "ROTATE_REFRESH_TOKEN": True,
            "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": int(os.environ.get("TOKEND_PEER_GRACE_SECONDS", "0")),
            "REFRESH_TOKEN_REUSE_PROTECTION": True,
            "PKCE_REQUIRED": True,
            "SCOPES": {"read": "Read", "write": "Write"},
        },
    )
    django.setup()


def login_view(request):
    from django.contrib.auth import authenticate, login
    from django.http import HttpResponse, HttpResponseForbidden

    user = authenticate(request, username=request.POST.get("username"), password=request.POST.get("password"))
    if user is None:
        return HttpResponseForbidden("bad credentials")
    login(request, user)
    return HttpResponse("logged in")


def urls():
    from django.urls import include, path
    from django.views.decorators.csrf import csrf_exempt

    return [
        path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
        path("login/", csrf_exempt(login_view)),
    ]


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "setup":
        db, client_id, client_secret, redirect_uri = args
        configure(db)
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from oauth2_provider.models import Application

        call_command("migrate", verbosity=0)
        alice = User.objects.create_user("alice", password="alice-password")
        Application.objects.create(
            name="tokend",
            user=alice,
            client_id=client_id,
            client_secret=client_secret,
            client_type=Application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
            redirect_uris=redirect_uri,
            skip_authorization=True,
        )
        print("ready")
    elif command == "serve":
        db, port = args
        configure(db)
        from django.core.management import call_command

        # ROOT_URLCONF is this module; its URLs can only be built once settings exist.
        globals()["urlpatterns"] = urls()
        call_command("runserver", f"127.0.0.1:{port}", use_reloader=False, use_threading=True)
    elif command == "browse":
        import requests

        base, authorize_url = args
        browser = requests.Session()
        r = browser.post(f"{base}/login/", data={"username": "alice", "password": "alice-password"})
        r.raise_for_status()
        r = browser.get(authorize_url, allow_redirects=False)
        if r.status_code != 302:
            sys.exit(f"authorize answered {r.status_code}: {r.text[:300]}")
        location = r.headers["Location"]
        delivered = requests.get(location, timeout=10)
        print(delivered.status_code, delivered.text.strip()[:120])
    elif command == "refresh":
        import requests

        base, client_id, client_secret, refresh_token = args
        r = requests.post(
            f"{base}/o/token/",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(client_id, client_secret),
            timeout=10,
        )
        error = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
        print(r.status_code, error)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
