// Keeps dashboard pages current without a reload: every element with data-fragment is replaced
// by a fresh server-rendered copy of itself every data-refresh-ms milliseconds. Polling stops
// once the fragment says it is final (a task that ended) or the session is gone (401: the login
// page). No inline script anywhere: the Content-Security-Policy allows this file only.
"use strict";

function isFinal(element) {
  return element.hasAttribute("data-final") || element.querySelector("[data-final]") !== null;
}

function logAtBottom(element) {
  const log = element.querySelector("pre.log");
  return log === null || log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
}

function followLog(element, wasAtBottom) {
  const log = element.querySelector("pre.log");
  if (log !== null && wasAtBottom) {
    log.scrollTop = log.scrollHeight;
  }
}

function poll(element) {
  const url = element.getAttribute("data-fragment");
  const interval = Number(element.getAttribute("data-refresh-ms")) || 2000;
  let busy = false;

  async function refresh() {
    // A field being filled in or a slow answer: skip this round rather than pile up requests.
    const typing = element.contains(document.activeElement) && document.activeElement.matches("input, select, textarea");
    if (busy || document.hidden || typing) {
      return;
    }
    busy = true;
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "text/html" },
      });
      if (response.status === 401) {
        window.location.assign(document.body.getAttribute("data-login"));
        return;
      }
      const html = await response.text();
      const wasAtBottom = logAtBottom(element);
      element.innerHTML = html;
      followLog(element, wasAtBottom);
      element.setAttribute("data-refreshed-at", String(Date.now()));
      if (response.ok && isFinal(element)) {
        window.clearInterval(timer);
      }
    } catch (error) {
      // The network blinked: the next round tries again.
    } finally {
      busy = false;
    }
  }

  if (isFinal(element)) {
    return;
  }
  const timer = window.setInterval(refresh, interval);
}

function confirmBeforeSubmit(event) {
  const form = event.target.closest("form[data-confirm]");
  if (form !== null && !window.confirm(form.getAttribute("data-confirm"))) {
    event.preventDefault();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-fragment]").forEach(poll);
  document.addEventListener("submit", confirmBeforeSubmit);
  document.querySelectorAll("pre.log").forEach((log) => {
    log.scrollTop = log.scrollHeight;
  });
});
