// Standalone start for patients: redeem an access code for a patient session.
"use strict";
(function () {
  const KEY = "exchange.viewer";
  const form = document.getElementById("access-form");
  const error = document.getElementById("access-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const code = document.getElementById("access-code").value.trim();
    let answer;
    try {
      answer = await fetch("/exchange/access-codes/redeem", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ code }),
        cache: "no-store",
      });
    } catch (_) {
      error.textContent = "The exchange cannot be reached; try again.";
      return;
    }
    let body = {};
    try {
      body = await answer.json();
    } catch (_) {
      body = {};
    }
    if (!answer.ok) {
      error.textContent = body.error || body.detail || `The code was not accepted (${answer.status}).`;
      return;
    }
    const session = {
      access_token: body.access_token,
      expires_in: body.expires_in,
      scope: body.scope || "",
      patient: String(body.patient || "").replace(/^Patient\//, ""),
      studies: (body.studies || []).map((s) => String(s).replace(/^ImagingStudy\//, "")),
      fhirContext: [],
      iss: `${location.origin}/fhir`,
      launch: null,
      source: "access-code",
    };
    sessionStorage.setItem(KEY, JSON.stringify({ main: session }));
    location.assign("/viewer/");
  });
})();
