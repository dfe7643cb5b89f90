// choreo console: live updates by polling the page itself, and the as-of slider. No dependencies.
(function () {
  "use strict";
  var body = document.body;
  var POLL_MS = 2000;

  function wireAsOf(root) {
    root.querySelectorAll("input[data-autosubmit]").forEach(function (range) {
      var form = range.form;
      var number = form.querySelector(".asof-number");
      range.addEventListener("input", function () { if (number) number.value = range.value; });
      range.addEventListener("change", function () { if (number) number.value = range.value; form.submit(); });
    });
  }

  function busy() {
    var active = document.activeElement;
    return active && (active.tagName === "INPUT" || active.tagName === "SELECT" || active.tagName === "TEXTAREA");
  }

  function poll() {
    if (!body.dataset.live || document.hidden || busy()) return;
    fetch(window.location.href, { headers: { "X-Choreo-Poll": "1" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        var main = document.getElementById("live");
        var status = doc.getElementById("status");
        if (fresh && main && fresh.innerHTML !== main.innerHTML) {
          main.innerHTML = fresh.innerHTML;
          wireAsOf(main);
        }
        if (status) {
          document.getElementById("status").textContent = status.textContent + " · updated " +
            new Date().toLocaleTimeString();
        }
      })
      .catch(function () { /* the server is away: try again at the next tick */ });
  }

  // a filter left empty stays out of the address (it can be bookmarked and shared)
  document.querySelectorAll("form.filters").forEach(function (form) {
    form.addEventListener("submit", function () {
      form.querySelectorAll("input, select").forEach(function (field) { if (!field.value) field.disabled = true; });
    });
  });

  wireAsOf(document);
  if (body.dataset.live) window.setInterval(poll, POLL_MS);
})();
