"""Where notifications leave.

dispatch.py     claim the due ones, prepare each with the preparer of its kind, commit `sending`,
                send, record the outcome (steps.py, pure)
preparer.py     what a preparer answers: an Email, or why not (now, or at all)
appointment.py  appointment notifications (with recipients.py: who, from the Patient record)
crm.py          CRM notifications (the event reopened from the inbox)
aftercare.py    after a send: Paubox webhooks, receipts, the in-doubt policy
"""
