// The callback page: keep the token answer for this tab only, then open the viewer.
"use strict";
(function () {
  const KEY = "exchange.viewer";
  const data = JSON.parse(document.getElementById("handover").textContent);
  let saved = {};
  try {
    saved = JSON.parse(sessionStorage.getItem(KEY) || "{}") || {};
  } catch (_) {
    saved = {};
  }
  if (data.purpose === "ETREAT") {
    // Break-the-glass: a second, emergency token beside the ordinary one.
    saved.emergency = data;
  } else {
    saved = { main: data };
  }
  sessionStorage.setItem(KEY, JSON.stringify(saved));
  location.replace("/viewer/");
})();
