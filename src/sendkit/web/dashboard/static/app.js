// SendKit dashboard: copy buttons and confirmations. No inline scripts (the pages' CSP
// allows only files from this server); everything works without JavaScript except copying.
(function () {
  "use strict";

  function textOf(button) {
    if (button.dataset.copy !== undefined && button.dataset.copy !== "") {
      return button.dataset.copy;
    }
    var target = document.getElementById(button.dataset.copyTarget || "");
    if (!target) return "";
    return target.value !== undefined ? target.value : target.textContent;
  }

  function fallbackCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } finally { document.body.removeChild(area); }
  }

  function copied(button) {
    var label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    button.textContent = "Copied";
    button.setAttribute("data-copied", "");
    window.setTimeout(function () {
      button.textContent = label;
      button.removeAttribute("data-copied");
    }, 1600);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-copy], button[data-copy-target]");
    if (!button) return;
    event.preventDefault();
    var text = textOf(button);
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { copied(button); }, function () {
        fallbackCopy(text); copied(button);
      });
    } else {
      fallbackCopy(text);
      copied(button);
    }
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
})();
